"""Finding image files and loading them in batches, reporting the ones that fail."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CocaError
from .transforms import ImageLoadError, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def collect_images(inputs: Iterable[str]) -> list[Path]:
    """Files as given, image files under directories (recursively), and glob patterns.

    Explicit files are kept whatever their suffix (so a bad one is reported, not
    skipped silently); directories contribute files with image suffixes only.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
        else:
            raise CocaError(f"no such file or directory: {item}")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise CocaError(f"no images found in: {', '.join(map(str, inputs))}")
    return unique


@dataclass
class Batch:
    paths: list[Path]
    images: Optional[torch.Tensor]  # [B, 3, H, W] for the paths that loaded
    failures: list[tuple[Path, str]]  # (path, reason) for the ones that did not


class _ImageFiles(Dataset):
    def __init__(self, paths: list[Path], transform: Callable):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            return path, self.transform(load_image(path)), None
        except ImageLoadError as err:
            return path, None, err.reason
        except (OSError, ValueError) as err:  # a decoder error surfacing during transform
            return path, None, f"cannot decode image ({err})"


def _collate(items) -> Batch:
    good = [(p, x) for p, x, _ in items if x is not None]
    return Batch(
        paths=[p for p, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        failures=[(p, reason) for p, x, reason in items if x is None],
    )


def iter_batches(paths: list[Path], transform: Callable, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """Batches in input order; decoding runs in ``workers`` background processes."""
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, shuffle=False)
    yield from loader
