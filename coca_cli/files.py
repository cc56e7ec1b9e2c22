"""Files written whole or not at all, and only where coca may write.

A reader never finds half a checkpoint, table or shard; a failed write (a full disk) is one line
naming the file and the OS reason; a folder holding files coca did not write is never written into.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable

from .errors import CocaError, writing

_TEMP_FILE = re.compile(r"^\..+\.tmp$")  # atomic_write's temporary files, left behind by a killed run


def atomic_write(target: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file.

    ``write(tmp)`` writes the file at path ``tmp``. On any failure the temporary file is removed
    and the previous ``target``, if any, is left as it was; OS failures become one CocaError line.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class NotRegularFile(OSError):
    """A FIFO, socket or device where a file was expected."""


def open_regular(path) -> BinaryIO:
    """Open a file for reading, refusing what is not a regular file: opening a FIFO waits for a
    writer forever and a device such as /dev/zero never ends. The type is checked before opening (a
    socket cannot be opened at all) and again on the opened descriptor (O_NONBLOCK keeps a FIFO's open
    from blocking), so a file swapped in between is caught too."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def atomic_torch_save(target: Path, obj) -> None:
    """``torch.save`` through :func:`atomic_write` and a Python file: given a path, torch reports a
    full disk only as "unexpected pos" in inline_container.cc; through a file the OSError survives."""
    import torch

    def write(tmp):
        with open(tmp, "wb") as file:
            torch.save(obj, file)

    atomic_write(target, write)


def claim_folder(folder: Path, ours: Iterable[str], option: str = "--output") -> None:
    """Refuse (exit 2) to write into a folder that holds anything but ``ours``, the names coca writes
    there (and atomic_write's temporary files): an absent or empty folder, or one coca wrote, is
    ours; any other folder is someone else's, and none of its files may be replaced."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CocaError(f"{option} {folder} is a file, not a folder")
    if not folder.is_dir():
        return
    names = set(ours)
    others = sorted(p.name for p in folder.iterdir() if p.name not in names and not _TEMP_FILE.match(p.name))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise CocaError(f"{option} {folder} holds files coca did not write ({shown}); refusing to write into it: "
                        "choose a new or empty folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
