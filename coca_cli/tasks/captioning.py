"""Captioning many images: batched generation and result files that survive interruption."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

import torch

from ..data.images import iter_batches
from .output import FILE_FORMATS, RecordWriter, file_format
from ..data.tokenizer import decode

# .txt is path<TAB>caption lines, like stdout; .tsv a real TSV with a header (see RecordWriter)
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
    path<TAB>caption lines (or JSON Lines) go to stdout.
    """

    def __init__(self, output: Optional[Path] = None, as_json: bool = False, resume: bool = False):
        fmt = file_format(output, OUTPUT_FORMATS) if output is not None else ("jsonl" if as_json else "txt")
        self.output = output
        self.done: set[str] = read_done(output, fmt) if (resume and output and output.exists()) else set()
        self._file: TextIO
        fresh = True
        if output is None:
            self._file = sys.stdout
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            fresh = not (resume and output.exists() and output.stat().st_size > 0)
            if not fresh:
                _drop_partial_line(output)
            self._file = open(output, "w" if fresh else "a", encoding="utf-8", newline="")
        self._records = RecordWriter(self._file, fmt, COLUMNS, header=fresh)

    def write(self, image: str, caption: str) -> None:
        self._records.write({"image": image, "caption": caption}, [(image, caption)])

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so appending starts on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_done(path: Path, fmt: str) -> set[str]:
    """Images already captioned in an earlier (maybe interrupted) run's output file."""
    done = set()
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                try:
                    done.add(json.loads(line)["image"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the interruption: caption it again
        elif fmt in ("csv", "tsv"):
            rows = csv.reader(f, delimiter="," if fmt == "csv" else "\t")
            next(rows, None)
            done.update(row[0] for row in rows if len(row) == 2)
        else:
            done.update(line.split("\t", 1)[0] for line in f if line.endswith("\n") and "\t" in line)
    return done
