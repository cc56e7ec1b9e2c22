"""CSV/TSV tables of image paths and captions (open_clip's ``--csv-*`` format) as samples."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from torch.utils.data import Dataset

from ..errors import CocaError
from .samples import SkipSample, decode_image, failing_on, sample_seed, seeded

MAX_SUBSTITUTIONS = 64  # CSV: how far to look for a readable sample in place of a broken one


def column_separator(path: Path, separator: Optional[str] = None) -> str:
    """The separator given (``\\t`` or ``tab`` spelled out for a tab), else by suffix: ',' for .csv,
    tab otherwise (open_clip's default)."""
    if separator is None:
        return "," if Path(path).suffix.lower() == ".csv" else "\t"
    return "\t" if separator in ("\\t", "tab") else separator


def read_table(path: str, img_key: str, caption_key: str, separator: Optional[str]) -> tuple[list[str], list]:
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise CocaError(f"data file not found: {path}")
    sep = column_separator(file, separator)
    try:
        table = pd.read_csv(file, sep=sep, dtype=str, keep_default_na=False,
                            engine="python" if len(sep) > 1 else "c")
    except UnicodeDecodeError as err:
        raise CocaError(f"{file} is not UTF-8 text (byte {err.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise CocaError(f"cannot read {file} as a table: {str(err).splitlines()[0] if str(err) else err}") from None
    missing = [k for k in (img_key, caption_key) if k not in table.columns]
    if missing:
        raise CocaError(f"{file} has no column {', '.join(repr(m) for m in missing)} (columns: "
                        f"{', '.join(map(str, table.columns))}; choose with --csv-img-key/--csv-caption-key)")
    if len(table) == 0:
        raise CocaError(f"{file} has no rows")
    base = file.parent
    paths = []
    for name in table[img_key].tolist():
        p = Path(name).expanduser()
        paths.append(str(p if p.is_absolute() or p.exists() else base / p))  # relative to cwd, else to the table
    return paths, table[caption_key].tolist()


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
            data = Path(self.paths[index]).read_bytes()
        except OSError:
            raise SkipSample("unreadable image") from None
        with failing_on(self.paths[index]):
            image = decode_image(data)
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

