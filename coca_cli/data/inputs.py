"""Finding the image files a command was given, without importing torch.

A command checks its inputs first, so a mistyped path is reported at once instead of after the
seconds torch takes to import.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

from ..errors import CocaError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def require_path(path: Path | None, what: str) -> None:
    """The file an option names (None: the option was not used) exists, checked before torch is
    imported; ``what`` names its role in the message ("labels file")."""
    if path is not None and not Path(path).expanduser().exists():
        raise CocaError(f"no such {what}: {path}")


def collect_images(inputs: Iterable[str]) -> list[Path]:
    """Files as given, image files under directories (recursively), and glob patterns.

    Explicit files are kept whatever their suffix (so a bad one is reported, not
    skipped silently); directories contribute files with image suffixes only. A pipe or
    device among them is kept too, to be reported as not a regular file when it is loaded.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if _is_file_like(p) and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True)
                            if _is_file_like(Path(p)))
        else:
            raise CocaError(f"no such file or directory: {item}")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise CocaError(f"no images found in: {', '.join(map(str, inputs))}")
    return unique


def _is_file_like(path: Path) -> bool:
    """A file, or something else that exists and is not a folder (a FIFO, socket or device)."""
    return path.exists() and not path.is_dir()
