"""Captioning many images: batched generation and result files that survive interruption."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..data.images import iter_batches
from ..errors import CocaError, reading
from .output import FILE_FORMATS, RecordFile, RecordWriter, check_replaceable, file_format, unescape_field
from ..data.tokenizer import decode

# .txt is path<TAB>caption lines (fields escaped), like stdout; .tsv a real TSV with a header (see RecordWriter)
OUTPUT_FORMATS = {**FILE_FORMATS, ".json": "jsonl", ".txt": "txt"}
COLUMNS = ("image", "caption")


def caption_images(model, transform: Callable, paths: list[Path], batch_size: int = 8, workers: int = 0,
                   generator: Optional[torch.Generator] = None, **generate_kwargs) -> Iterator[tuple[Path, Optional[str], Optional[str]]]:
    """Yield ``(path, caption, None)`` per image, or ``(path, None, reason)`` when it cannot be read."""
    param = next(model.parameters())
    for batch in iter_batches(paths, transform, batch_size, workers):
        for path, reason in batch.failures:
            yield path, None, reason
        if batch.images is None:
            continue
        images = batch.images.to(device=param.device, dtype=param.dtype, non_blocking=True)
        tokens = model.generate(images, generator=generator, **generate_kwargs)
        for path, ids in zip(batch.paths, tokens.tolist()):
            yield path, decode(ids), None


class CaptionWriter:
    """Writes one line per caption as soon as it exists, flushed, so nothing done is lost.

    The format follows the output file's suffix (.jsonl, .csv, .tsv, .txt); without a file,
    path<TAB>caption lines (or JSON Lines) go to stdout. An existing file that coca did not write
    is refused before anything starts; with ``resume`` an earlier run's file is read
    (:func:`read_earlier_run`) and added to, else it is replaced once the first caption is ready.
    """

    def __init__(self, output: Optional[Path] = None, as_json: bool = False, resume: bool = False):
        fmt = file_format(output, OUTPUT_FORMATS) if output is not None else ("jsonl" if as_json else "txt")
        self.output = output
        self.earlier = EarlierRun(set(), 0, None)
        self._file: Optional[RecordFile] = None
        if output is not None:
            check_replaceable(output, fmt)
            if resume and output.is_file():
                self.earlier = read_earlier_run(output, fmt)
            self._file = RecordFile(output, fmt, COLUMNS, keep=self.earlier.whole_bytes or None)
        self.done = self.earlier.done
        self._records = self._file or RecordWriter(sys.stdout, fmt, COLUMNS)

    def write(self, image: str, caption: str) -> None:
        self._records.write({"image": image, "caption": caption}, [(image, caption)])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class EarlierRun:
    """What an earlier run's output file holds."""

    done: set[str]  # the images captioned in it
    whole_bytes: int  # its length up to the end of the last whole record
    cut_line: Optional[int]  # the number of a last line cut short by a killed run, dropped and redone


def parse_caption_line(text: str, fmt: str, where: str) -> tuple[str, str]:
    """(image, caption) from one line of a jsonl or txt captions file; ``where`` ("FILE, line N")
    starts the error a malformed line raises."""
    if fmt == "txt":
        text = text.rstrip("\r\n")
        if text.count("\t") != 1:
            raise CocaError(f"{where}: expected image<TAB>caption")
        image, caption = text.split("\t")
        return unescape_field(image), unescape_field(caption)
    try:
        row = json.loads(text)
    except ValueError as err:
        raise CocaError(f"{where}: not valid JSON ({err.args[0].split(':')[0]})") from None
    if not isinstance(row, dict) or "image" not in row or "caption" not in row:
        raise CocaError(f"{where}: expected a JSON object with fields image and caption")
    if not isinstance(row["image"], str) or not isinstance(row["caption"], str):
        raise CocaError(f"{where}: expected an image path and a caption (strings)")
    return row["image"], row["caption"]


def read_earlier_run(path: Path, fmt: str) -> EarlierRun:
    """The images an earlier (maybe interrupted) run captioned into ``path``, for ``--resume``.

    A last record without its line end was cut short by a killed run: it is left out (and
    dropped from the file before new lines are added), so its image is captioned again. Any
    other damage (a malformed line, bytes that are not UTF-8) is an error naming the line: a
    file that is not read exactly could make the run caption images twice.
    """
    with reading(path, "--resume file"):
        data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    try:
        lines = [line + "\n" for line in whole.decode("utf-8").split("\n")[:-1]]
    except UnicodeDecodeError as err:
        raise _damaged(path, whole[:err.start].count(b"\n") + 1, "not UTF-8 text") from None
    done: set[str] = set()
    kept = 0
    for image, kept in _records(path, fmt, lines, cut=len(whole) < len(data)):
        if image is not None:
            done.add(image)
    return EarlierRun(done, kept, data[:kept].count(b"\n") + 1 if kept < len(data) else None)


def _records(path: Path, fmt: str, lines: list[str], cut: bool) -> Iterator[tuple[Optional[str], int]]:
    """(image, or None for a header or blank line; byte offset where the record ends) for each
    record of a captions file's whole ``lines``. ``cut``: the file ends in an unfinished line, so a
    CSV record still open at the end (a quoted file name holding a newline) is that unfinished one."""
    end = 0

    def feed():
        nonlocal end
        for line in lines:
            end += len(line.encode("utf-8"))
            yield line

    if fmt not in ("csv", "tsv"):
        for number, line in enumerate(feed(), start=1):
            try:
                yield (parse_caption_line(line, fmt, f"{path}, line {number}")[0] if line.strip() else None), end
            except CocaError as err:
                raise CocaError(f"{err}{_RESUME_HINT}") from None
        return
    rows = csv.reader(feed(), delimiter="," if fmt == "csv" else "\t", strict=True)
    try:
        for row in rows:
            if rows.line_num > 1 and row and len(row) != len(COLUMNS):
                raise _damaged(path, rows.line_num, f"expected {' and '.join(COLUMNS)}")
            yield (row[0] if rows.line_num > 1 and row else None), end
    except csv.Error as err:
        if not (cut and rows.line_num == len(lines)):
            raise _damaged(path, rows.line_num, f"not a well-formed row ({err})") from None


_RESUME_HINT = " (--resume needs each line whole: fix or remove it, or caption without --resume)"


def _damaged(path: Path, line: int, reason: str) -> CocaError:
    return CocaError(f"{path}, line {line}: {reason}{_RESUME_HINT}")
