"""Finding image files and loading them in batches, reporting the ones that fail."""

from __future__ import annotations

import glob
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

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
    """One decoded image per item. Each worker records the item it is on, so that a worker that
    dies (a decoder crash, the out-of-memory killer) can be reported with the file it was reading."""

    def __init__(self, paths: list[Path], transform: Callable, workers: int):
        self.paths, self.transform = paths, transform
        self.busy = multiprocessing.Array("q", max(workers, 1), lock=False)  # per worker: item + 1, or 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        info = get_worker_info()
        slot = info.id if info is not None else 0
        self.busy[slot] = i + 1
        path = self.paths[i]
        try:
            return path, self.transform(load_image(path)), None
        except ImageLoadError as err:
            return path, None, err.reason
        except (OSError, ValueError) as err:  # a decoder error surfacing during transform
            return path, None, f"cannot decode image ({err})"
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever else breaks on this file, it is this file's failure
            return path, None, f"failed: {type(err).__name__}: {err}"
        finally:
            self.busy[slot] = 0

    def in_flight(self) -> list[Path]:
        return [self.paths[item - 1] for item in self.busy if item]


def _collate(items) -> Batch:
    good = [(p, x) for p, x, _ in items if x is not None]
    return Batch(
        paths=[p for p, _ in good],
        images=torch.stack([x for _, x in good]) if good else None,
        failures=[(p, reason) for p, x, reason in items if x is None],
    )


def iter_batches(paths: list[Path], transform: Callable, batch_size: int, workers: int = 0) -> Iterator[Batch]:
    """Batches in input order; decoding runs in ``workers`` background processes."""
    files = _ImageFiles(paths, transform, workers)
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=_collate, shuffle=False)
    try:
        yield from loader
    except RuntimeError as err:
        if not str(err).startswith("DataLoader worker"):
            raise
        busy = files.in_flight()
        reading = f"{'one of ' if len(busy) > 1 else ''}{', '.join(map(str, busy))}" if busy else "an image"
        raise CocaError(f"a worker decoding images died while reading {reading} ({str(err).strip()}); "
                        "results so far are kept", exit_code=1) from None
