"""CSV/TSV tables of image paths and captions (open_clip's ``--csv-*`` format): one parser for
every table coca reads (training data, retrieval pairs, caption references and predictions).

A table has a header row; each row after it must have as many fields as the header, so an
unquoted separator inside a caption is an error naming its line, never a silently cut caption.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from torch.utils.data import Dataset

from ..errors import CocaError, reading
from ..files import open_regular
from .samples import SkipSample, decode_image, failing_on, sample_seed, seeded
from .transforms import decodes_lazily

MAX_SUBSTITUTIONS = 64  # CSV: how far to look for a readable sample in place of a broken one


def column_separator(path: Path, separator: Optional[str] = None) -> str:
    """The separator given (``\\t`` or ``tab`` spelled out for a tab), else by suffix: ',' for .csv,
    tab otherwise (open_clip's default)."""
    if separator is None:
        return "," if Path(path).suffix.lower() == ".csv" else "\t"
    return "\t" if separator in ("\\t", "tab") else separator


def read_rows(path: Path, columns: Sequence[str], separator: Optional[str] = None,
              choose: str = "") -> list[tuple[int, tuple[str, ...]]]:
    """(line number, the values of ``columns``) for each row of a CSV/TSV with a header (see
    :func:`read_whole_rows`). A missing column is a CocaError naming the file; ``choose`` names the
    options that pick others."""
    path = Path(path).expanduser()
    header, rows = read_whole_rows(path, separator)
    where = column_indexes(path, header, columns, choose)
    return [(line, tuple(row[i] for i in where)) for line, row in rows]


def column_indexes(path: Path, header: Sequence[str], columns: Sequence[str], choose: str = "") -> list[int]:
    """Where ``columns`` are in a table's ``header``; a missing one is a CocaError naming the file
    (``choose`` names the options that pick other columns)."""
    missing = [name for name in columns if name not in header]
    if missing:
        raise CocaError(f"{path} has no column {', '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(header) or 'none'})" + (f"; choose them with {choose}" if choose else ""))
    return [list(header).index(name) for name in columns]


def read_whole_rows(path: Path, separator: Optional[str] = None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, every field)]) of a CSV/TSV, blank lines skipped. A row with more or
    fewer fields than the header, or broken quoting, is a CocaError naming the file and line."""
    path = Path(path).expanduser()
    sep = column_separator(path, separator)
    if len(sep) != 1:
        raise CocaError(f"separator must be one character, got '{sep}'")
    rows = []
    with reading(path), open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep, strict=True)
        line = 1  # where the next row starts (a quoted field may span lines)
        try:
            header = next(reader, [])
            line = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    raise CocaError(f"{path}, line {line}: {len(row)} field{'s' * (len(row) != 1)} where the "
                                    f"header has {len(header)} (a field holding {sep!r} must be quoted)")
                if row:
                    rows.append((line, row))
                line = reader.line_num + 1
        except csv.Error as err:
            raise CocaError(f"{path}, line {line}: not a well-formed table row ({err}); quote a whole field, "
                            "doubling any quote inside it") from None
    return header, rows


def image_path(name: str, table: Path) -> str:
    """An image path as a training table gives it: relative to the working directory, else to the table."""
    p = Path(name).expanduser()
    return str(p if p.is_absolute() or p.exists() else Path(table).parent / p)


def read_table(path: str, img_key: str, caption_key: str, separator: Optional[str]) -> tuple[list[str], list]:
    """Training data: (image paths, captions), paths relative to the working directory, else to the table."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CocaError(f"data file not found: {path}")
    rows = read_rows(file, (img_key, caption_key), separator, choose="--csv-img-key/--csv-caption-key")
    if not rows:
        raise CocaError(f"{file} has no rows")
    return [image_path(name, file) for _, (name, _) in rows], [caption for _, (_, caption) in rows]


@dataclass
class Pairs:
    """Image-caption pairs; one image may have several captions."""

    images: list[Path]  # unique, in order of first appearance
    captions: list[str]
    caption_image: list[int]  # index into ``images`` of each caption's image

    def keep(self, loaded: Sequence[Path]) -> "Pairs":
        """Only the images that loaded (in that order) and their captions."""
        new_index = {path: i for i, path in enumerate(loaded)}
        kept = [(text, new_index[self.images[i]]) for text, i in zip(self.captions, self.caption_image)
                if self.images[i] in new_index]
        return Pairs(list(loaded), [text for text, _ in kept], [i for _, i in kept])


def read_pairs(path: Path, img_key: str = "filepath", caption_key: str = "title",
               separator: Optional[str] = None) -> Pairs:
    """Image paths and captions for evaluation (open_clip's CsvDataset layout).

    Relative image paths are taken from the file's folder, so a dataset can be moved whole.
    """
    path = Path(path).expanduser()
    rows = read_rows(path, (img_key, caption_key), separator, choose="--img-key and --caption-key")
    if not rows:
        raise CocaError(f"no image-caption pairs in {path}")
    index: dict[Path, int] = {}
    captions, caption_image = [], []
    for line, (image, caption) in rows:
        if not image.strip() or not caption.strip():
            raise CocaError(f"{path}, line {line}: empty image path or caption")
        image_path = path.parent / image.strip()
        captions.append(caption.strip())
        caption_image.append(index.setdefault(image_path, len(index)))
    return Pairs(list(index), captions, caption_image)


class CsvSamples(Dataset):
    """Items are (index, epoch) pairs; a broken sample is replaced by the next readable one."""

    def __init__(self, paths: list[str], captions: list, transform: Callable, seed: int):
        self.paths, self.captions, self.transform, self.seed = paths, captions, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, epoch: int):
        caption = self.captions[index]
        if not isinstance(caption, str) or not caption.strip():
            raise SkipSample("no caption")
        try:
            with open_regular(self.paths[index]) as file:  # a FIFO or device among the paths must not hang
                data = file.read()
        except OSError:
            raise SkipSample("unreadable image") from None
        with failing_on(self.paths[index]):
            image = decode_image(data, lazy=decodes_lazily(self.transform))
            return seeded(self.transform, image, sample_seed(self.seed, epoch, index)), caption.strip()

    def __getitem__(self, item):
        index, epoch = item
        skipped: Counter = Counter()
        for attempt in range(MAX_SUBSTITUTIONS):
            try:
                image, caption = self.load((index + attempt) % len(self.paths), epoch)
                return image, caption, skipped
            except SkipSample as why:
                skipped[str(why)] += 1
        raise CocaError(f"{MAX_SUBSTITUTIONS} unusable samples in a row from row {index} of the table "
                        f"({', '.join(f'{n} {k}' for k, n in skipped.items())})")

