"""Captioning many images: batched generation and result files that survive interruption."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

import torch

from .errors import CocaError
from .images import iter_batches
from .tokenizer import decode

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "tsv", ".tsv": "tsv"}


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

    The format follows the output file's suffix (.jsonl, .csv, .txt/.tsv); without a file,
    tab-separated lines (or JSON Lines) go to stdout.
    """

    def __init__(self, output: Optional[Path] = None, as_json: bool = False, resume: bool = False):
        if output is None:
            self.format = "jsonl" if as_json else "tsv"
        else:
            suffix = output.suffix.lower()
            if suffix not in OUTPUT_FORMATS:
                raise CocaError(f"unsupported output file type '{suffix or output.name}' (use .jsonl, .csv or .txt)")
            self.format = OUTPUT_FORMATS[suffix]
        self.output = output
        self.done: set[str] = read_done(output, self.format) if (resume and output and output.exists()) else set()
        self._file: TextIO
        if output is None:
            self._file = sys.stdout
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            fresh = not (resume and output.exists() and output.stat().st_size > 0)
            if not fresh:
                _drop_partial_line(output)
            self._file = open(output, "w" if fresh else "a", encoding="utf-8", newline="")
            if self.format == "csv" and fresh:
                csv.writer(self._file).writerow(["image", "caption"])
        self._csv = csv.writer(self._file) if self.format == "csv" else None

    def write(self, image: str, caption: str) -> None:
        if self.format == "jsonl":
            self._file.write(json.dumps({"image": image, "caption": caption}, ensure_ascii=False) + "\n")
        elif self._csv is not None:
            self._csv.writerow([image, caption])
        else:
            self._file.write(f"{image}\t{caption}\n")
        self._file.flush()

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
        elif fmt == "csv":
            rows = csv.reader(f)
            next(rows, None)
            done.update(row[0] for row in rows if len(row) == 2)
        else:
            done.update(line.split("\t", 1)[0] for line in f if line.endswith("\n") and "\t" in line)
    return done
