"""Fetching MS COCO's archives: resumable downloads, size-checked, extracted atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import CocaError
from .coco import OFFICIAL_SPLITS, YEARS, ProgressFn, check_splits, resolves_inside

COCO_BASE_URL = "http://images.cocodataset.org"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


@dataclass
class Archive:
    url: str
    provides: list[str]  # paths (relative to root) that, when present, mean it is not needed
    only: Optional[list[str]] = None  # file names to extract (all when None)


def coco_archives(year: str = "2014", style: str = "karpathy", splits: Optional[Iterable[str]] = None,
                  base_url: str = COCO_BASE_URL, karpathy_url: str = KARPATHY_URL) -> list[Archive]:
    """The archives the given split style and splits need, in download order."""
    if year not in YEARS:
        raise CocaError(f"unknown COCO release '{year}' (use {' or '.join(YEARS)})")
    if style not in ("karpathy", "official"):
        raise CocaError(f"unknown split style '{style}' (use karpathy or official)")
    wanted = check_splits(style, splits)
    base = base_url.rstrip("/")
    captions = [f"captions_train{year}.json", f"captions_val{year}.json"]
    out = [Archive(f"{base}/annotations/annotations_trainval{year}.zip", [f"annotations/{c}" for c in captions],
                   only=captions)]
    if style == "karpathy":
        out.append(Archive(karpathy_url, ["dataset_coco.json"], only=["dataset_coco.json"]))
        image_splits = ["val"] + (["train"] if "train" in wanted else [])
    else:
        image_splits = [s for s in OFFICIAL_SPLITS if s in wanted]
    out += [Archive(f"{base}/zips/{s}{year}.zip", [f"{s}{year}"]) for s in image_splits]
    return out


def fetch_coco(root: Path, archives: list[Archive], keep_archives: bool = False,
               progress: Optional[ProgressFn] = None, log: Callable[[str], None] = lambda msg: None) -> None:
    """Download and extract each archive whose contents are not under ``root`` yet."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        if all(_present(root / p) for p in archive.provides):
            log(f"{', '.join(archive.provides)}: already there")
            continue
        name = archive.url.rstrip("/").rsplit("/", 1)[-1] or "download.zip"
        path = root / name
        if not path.is_file():
            download(archive.url, path, progress=progress)
        extract_zip(path, root, only=archive.only)
        if not keep_archives:
            path.unlink()
        log(f"extracted {name}")


def _present(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    if path.is_file():
        return True
    return path.name == "dataset_coco.json" and any(path.parent.glob("*/dataset_coco.json"))


def download(url: str, dest: Path, progress: Optional[ProgressFn] = None, timeout: float = 60.0,
             chunk: int = 1 << 20) -> Path:
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial file with a Range request.

    The file is renamed into place only once its size matches what the server announced; an
    interrupted transfer leaves the ``.part`` file for the next call to continue. A server that
    answers a resumption from byte 0 (a 200, or a 206 from the start) gets its body written over
    the ``.part`` file; one that answers from any other byte is asked once more, for the whole
    file: a ``.part`` file the server will not continue is never kept to fail the same way again.
    """
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "coca", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # our partial file is already complete (or longer): start over
            part.unlink()
            return download(url, dest, progress, timeout, chunk)
        raise CocaError(f"cannot download {url}: HTTP {err.code} {err.reason}", exit_code=1) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise CocaError(f"cannot download {url}: {reason}", exit_code=1) from None
    with response:
        # 200: the whole file (the server ignored or does not support ranges); 206: from `start`
        start = _range_start(response.headers.get("Content-Range")) if response.status == 206 else 0
        if start not in (0, have):
            if not have:  # the whole file was asked for
                raise CocaError(f"cannot download {url}: asked for the whole file, the server sent a part of it "
                                f"({response.headers.get('Content-Range') or 'no Content-Range'})", exit_code=1)
            response.close()
            part.unlink()
            return download(url, dest, progress, timeout, chunk)
        have = start
        length = response.headers.get("Content-Length")
        total = int(length) + have if length is not None else None
        mode = "ab" if have else "wb"
        label = dest.name
        done = have
        try:
            with open(part, mode) as f:
                if progress:
                    progress(label, done, total)
                while True:
                    data = response.read(chunk)
                    if not data:
                        break
                    f.write(data)
                    done += len(data)
                    if progress:
                        progress(label, done, total)
        except (OSError, ValueError) as err:  # connection reset, timeout, IncompleteRead
            raise CocaError(f"download of {url} interrupted after {done} of {total or '?'} bytes ({err}); "
                            "run the same command again to resume", exit_code=1) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise CocaError(f"download of {url} incomplete: {size} of {total} bytes; run the same command again to "
                        "resume", exit_code=1)
    os.replace(part, dest)
    return dest


def _range_start(content_range: Optional[str]) -> Optional[int]:
    try:  # "bytes 100-999/1000"
        return int(content_range.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def extract_zip(archive: Path, root: Path, only: Optional[list[str]] = None) -> list[Path]:
    """Extract into a temporary folder under ``root``, then move into place.

    A corrupt or truncated archive raises :class:`CocaError` and leaves nothing behind
    (the archive itself is deleted, so the next run downloads it afresh). Top-level folders
    that do not exist yet are moved in one rename; files of folders that exist
    (``annotations/``) are moved one by one, each complete.
    """
    root = Path(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=root))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                members = [m for m in zf.infolist() if only is None or Path(m.filename).name in only]
                if only is not None and not members:
                    raise CocaError(f"{archive.name} does not contain {', '.join(only)}", exit_code=1)
                for member in members:
                    target = _safe_target(tmp, member.filename, archive)
                    if member.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
            archive.unlink(missing_ok=True)
            raise CocaError(f"{archive.name} is corrupt or truncated ({err}); deleted it, nothing was extracted; "
                            "run the same command again to download it afresh", exit_code=1) from None
        moved = []
        for item in sorted(tmp.iterdir()):
            moved += _move_into(item, root / item.name)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_target(folder: Path, name: str, archive: Path) -> Path:
    target = folder / name
    if not resolves_inside(target, [folder.resolve()]):
        raise CocaError(f"{archive.name} holds an unsafe path ({name!r}); not extracted", exit_code=1)
    return target


def _move_into(src: Path, dst: Path) -> list[Path]:
    if not dst.exists():
        os.replace(src, dst)
        return [dst]
    if src.is_dir() and dst.is_dir():
        moved = []
        for item in sorted(src.iterdir()):
            moved += _move_into(item, dst / item.name)
        return moved
    if src.is_dir() or dst.is_dir():
        raise CocaError(f"cannot extract {src.name}: {dst} is in the way", exit_code=1)
    os.replace(src, dst)
    return [dst]
