"""Results for programs: JSON Lines, CSV or TSV, each record written and flushed as soon as it exists.

Commands show rich tables to people at a terminal; everything else (a pipe, ``> file``,
``--output FILE``) gets one of these formats, so that no script ever has to parse a table.

An ``--output`` file is replaced only when it is one coca wrote (:func:`check_replaceable`),
and only once the first new result is ready: a run that fails before producing anything leaves
the earlier file as it was, and a stopped run keeps every line it finished.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, TextIO

from ..errors import CocaError, writing
from ..files import atomic_write

FILE_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}

# Every column of the tables coca writes (caption, classify, retrieve): a .csv/.tsv whose header
# names only these is taken for one coca wrote.
RESULT_COLUMNS = frozenset({"image", "caption", "rank", "label", "probability", "query", "text", "score",
                            "default_caption", "default_score"})
# The fields of a `caption` .txt line: path and caption, then with --score its score, with
# --candidates also the default caption and its score.
CAPTION_LINE_FIELDS = (2, 3, 5)
# The fields of an `eval --output` JSON file.
EVAL_RESULT_KEYS = frozenset({"dataset", "task", "metrics"})

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {escaped: char for char, escaped in _ESCAPES.items()}


def file_format(path: Path, formats: dict[str, str] = FILE_FORMATS) -> str:
    """The format an output file's suffix names; any other suffix is refused, never guessed."""
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        raise CocaError(f"unsupported output file type '{suffix or Path(path).name}' (use {', '.join(formats)})")
    return formats[suffix]


def escape_field(text: str) -> str:
    """A field of a tab-separated line (``path<TAB>caption``): backslash, tab, newline and carriage
    return as ``\\\\ \\t \\n \\r``, so a file name holding them stays on its line and reads back the same."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def unescape_field(text: str) -> str:
    """The inverse of :func:`escape_field`; a backslash before any other character is kept as it is."""
    return re.sub(r"\\[\\tnr]", lambda match: _UNESCAPES[match.group()], text)


def to_json(record: dict, **kwargs) -> str:
    """``record`` as JSON. NaN and infinity, which JSON cannot hold (a bare ``NaN`` breaks every
    reader), are an error naming the record rather than written."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, **kwargs)
    except ValueError:
        name = next((f"{key} {value}" for key, value in record.items() if isinstance(value, str)), "")
        raise CocaError(f"the result{' for ' + name if name else ''} holds a non-finite number (NaN or infinity), "
                        "which JSON cannot represent: not written", exit_code=1) from None


class RecordWriter:
    """Writes one record at a time and flushes it, so an interrupted run keeps every finished line.

    jsonl: one JSON object per record. csv/tsv: a header, then each record's rows, quoted where a
    field holds the separator, a quote or a newline (a real CSV/TSV that any reader splits
    right). txt: the rows tab-joined, no header (``path<TAB>caption``: for eyes and ``cut``), each
    field escaped (:func:`escape_field`) so that one row is always one line.
    """

    def __init__(self, file: TextIO, fmt: str, columns: Sequence[str], header: bool = True):
        self.file, self.format = file, fmt
        self._table = self._quoted = None
        if fmt in ("csv", "tsv"):
            dialect = dict(delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
            self._table = csv.writer(file, **dialect)
            # csv quotes a field holding "\n" (the line end) but not a lone "\r", which readers also split on
            self._quoted = csv.writer(file, quoting=csv.QUOTE_ALL, **dialect)
            if header:
                self._table.writerow(columns)

    def write(self, record: dict, rows: Iterable[Sequence]) -> None:
        """``record`` is the JSON form, ``rows`` the same result as table rows (one or several)."""
        with writing(getattr(self.file, "name", "the output")):  # stdout on a full disk: one line too
            self._write(record, rows)

    def _write(self, record: dict, rows: Iterable[Sequence]) -> None:
        if self.format == "jsonl":
            self.file.write(to_json(record) + "\n")
        elif self._table is not None:
            for row in rows:
                (self._quoted if any("\r" in str(field) for field in row) else self._table).writerow(row)
        else:
            self.file.writelines("\t".join(escape_field(str(field)) for field in row) + "\n" for row in rows)
        self.file.flush()


class RecordFile:
    """A RecordWriter to a file that is created (or replaced) only when the first record comes, so a
    run that fails before producing anything leaves an earlier file as it was.

    ``keep``: add to an earlier run's file after its first ``keep`` bytes (what follows them, a line
    a killed run left unfinished, is dropped); None starts the file afresh, header first.
    """

    def __init__(self, path: Path, fmt: str, columns: Sequence[str], keep: Optional[int] = None):
        self.path, self.format, self.columns, self.keep = path, fmt, columns, keep
        self.file: Optional[TextIO] = None
        self._records: Optional[RecordWriter] = None

    def write(self, record: dict, rows: Iterable[Sequence]) -> None:
        with writing(self.path):  # a full disk: one line naming the file and the OS reason
            if self._records is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if self.keep is not None:
                    with open(self.path, "r+b") as earlier:
                        earlier.truncate(self.keep)
                self.file = open(self.path, "w" if self.keep is None else "a", encoding="utf-8", newline="")
                self._records = RecordWriter(self.file, self.format, self.columns, header=self.keep is None)
            self._records.write(record, rows)

    def close(self) -> None:
        if self.file is not None:
            with writing(self.path):
                self.file.close()


@contextmanager
def open_records(output: Optional[Path], stream_format: str, columns: Sequence[str]) -> Iterator:
    """A writer to ``output`` (format from its suffix; a RecordFile) or, without one, to stdout in
    ``stream_format``."""
    if output is None:
        yield RecordWriter(sys.stdout, stream_format, columns)
        return
    records = RecordFile(output, file_format(output), columns)
    try:
        yield records
    finally:
        records.close()


def check_replaceable(path: Optional[Path], fmt: str) -> None:
    """Refuse (exit 2, before any model loads) an ``--output`` that exists and is not a results file
    of the kind coca writes there, so a photo, a weights file or a data table named by mistake is
    never replaced. Ours: an empty file; .jsonl whose first line is a JSON object; .csv/.tsv whose
    header names only coca's result columns; .txt whose first line is ``path<TAB>caption`` (and
    the fields --score and --candidates add); an
    eval .json holding a JSON object with ``dataset``, ``task`` and ``metrics``.
    """
    if path is None or not path.exists():
        return
    if path.is_dir():
        raise CocaError(f"--output {path} is a folder; give a file name")
    if not path.is_file() or path.stat().st_size == 0:  # /dev/null, a pipe, an empty file: nothing to lose
        return
    if not _is_ours(path, fmt):
        raise CocaError(f"--output {path} exists and is not a {fmt} results file written by coca: not replacing it "
                        "(move it away or choose another name)")


def _is_ours(path: Path, fmt: str) -> bool:
    try:
        if fmt == "json":
            result = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(result, dict) and EVAL_RESULT_KEYS <= result.keys()
        with open(path, "rb") as f:
            line = f.readline(1 << 20).decode("utf-8").rstrip("\r\n")
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    if "\x00" in line:
        return False
    if fmt == "jsonl":
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return False
    if fmt in ("csv", "tsv"):
        header = next(csv.reader([line], delimiter="," if fmt == "csv" else "\t"), [])
        return bool(header) and set(header) <= RESULT_COLUMNS
    return line.count("\t") + 1 in CAPTION_LINE_FIELDS  # txt: path<TAB>caption..., each escaped


def write_json_file(path: Path, result: dict) -> None:
    """A results JSON file, written whole (through a temporary file) or not at all."""
    text = to_json(result, indent=2) + "\n"
    if path.exists() and not path.is_file():  # /dev/stdout and the like are written, not replaced
        path.write_text(text, encoding="utf-8")
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
