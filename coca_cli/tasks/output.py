"""Results for programs: JSON Lines, CSV or TSV, each record written and flushed as soon as it exists.

Commands show rich tables to people at a terminal; everything else (a pipe, ``> file``,
``--output FILE``) gets one of these formats, so that no script ever has to parse a table.
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, TextIO

from ..errors import CocaError

FILE_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def file_format(path: Path, formats: dict[str, str] = FILE_FORMATS) -> str:
    """The format an output file's suffix names; any other suffix is refused, never guessed."""
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        raise CocaError(f"unsupported output file type '{suffix or Path(path).name}' (use {', '.join(formats)})")
    return formats[suffix]


class RecordWriter:
    """Writes one record at a time and flushes it, so an interrupted run keeps every finished line.

    jsonl: one JSON object per record. csv/tsv: a header, then each record's rows, quoted where a
    field holds the separator, a quote or a newline (a real CSV/TSV that any reader splits
    right). txt: the rows tab-joined, no header (``path<TAB>caption``: for eyes and ``cut``).
    """

    def __init__(self, file: TextIO, fmt: str, columns: Sequence[str], header: bool = True):
        self.file, self.format = file, fmt
        self._table = None
        if fmt in ("csv", "tsv"):
            self._table = csv.writer(file, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
            if header:
                self._table.writerow(columns)

    def write(self, record: dict, rows: Iterable[Sequence]) -> None:
        """``record`` is the JSON form, ``rows`` the same result as table rows (one or several)."""
        if self.format == "jsonl":
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self._table is not None:
            self._table.writerows(rows)
        else:
            self.file.writelines("\t".join(map(str, row)) + "\n" for row in rows)
        self.file.flush()


@contextmanager
def open_records(output: Optional[Path], stream_format: str, columns: Sequence[str]) -> Iterator[RecordWriter]:
    """A writer to ``output`` (format from its suffix) or, without one, to stdout in ``stream_format``."""
    if output is None:
        yield RecordWriter(sys.stdout, stream_format, columns)
        return
    fmt = file_format(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8", newline="") as file:
        yield RecordWriter(file, fmt, columns)
