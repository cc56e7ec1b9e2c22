"""MS COCO captions: finding a download, writing training/evaluation files, fetching the archives.

What a COCO folder may hold (``root``):

* ``annotations/captions_{train,val}{2014,2017}.json`` — the official caption annotations;
* ``{train,val}{2014,2017}/`` (or ``images/{train,val}{2014,2017}/``) — the images,
  ``COCO_val2014_000000391895.jpg`` in 2014, ``000000391895.jpg`` in 2017 (same ids);
* ``dataset_coco.json`` anywhere up to two folders down — Karpathy's split (5000 val, 5000
  test, 113287 train incl. "restval" images, all from the 2014 release), the split every
  captioning paper reports on.

:func:`prepare_coco` writes one tab-separated file per split with columns ``filepath`` and
``title`` (one row per caption, the format open_clip's ``--csv-separator $'\\t'`` reads) and
optionally webdataset shards, one folder per split with a ``sizes.json`` (ready for ``coca train
--data``); :func:`fetch_coco` downloads and extracts the official archives.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import CocaError

COCO_BASE_URL = "http://images.cocodataset.org"
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
YEARS = ("2014", "2017")
SPLIT_STYLES = ("auto", "karpathy", "official")
KARPATHY_SPLITS = ("train", "val", "test")  # train = Karpathy's "train" + "restval"
OFFICIAL_SPLITS = ("train", "val")
TSV_COLUMNS = ("filepath", "title")
SIZES_FILE = "sizes.json"  # shard name -> samples, beside the shards (webdataset/img2dataset convention)

ProgressFn = Callable[[str, int, Optional[int]], None]  # (label, done, total or None)


# --------------------------------------------------------------------------------------------
# Finding what is there
# --------------------------------------------------------------------------------------------

@dataclass
class CocoSources:
    root: Path
    annotations: dict[tuple[str, str], Path] = field(default_factory=dict)  # (split, year) -> captions json
    image_dirs: dict[tuple[str, str], Path] = field(default_factory=dict)  # (split, year) -> folder
    karpathy: Optional[Path] = None  # dataset_coco.json

    @property
    def years(self) -> list[str]:
        return sorted({year for _, year in self.annotations})

    def describe(self) -> str:
        parts = [f"captions_{s}{y}.json" for s, y in sorted(self.annotations)]
        parts += [f"{s}{y}/" for s, y in sorted(self.image_dirs)]
        if self.karpathy:
            parts.append("dataset_coco.json")
        return ", ".join(parts) or "nothing"


def find_coco(root: Path) -> CocoSources:
    """What COCO pieces are under ``root`` (nothing is read yet)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CocaError(f"no such folder: {root}")
    found = CocoSources(root=root)
    for split in OFFICIAL_SPLITS:
        for year in YEARS:
            for folder in (root / "annotations", root):
                path = folder / f"captions_{split}{year}.json"
                if path.is_file():
                    found.annotations[(split, year)] = path
                    break
            for folder in (root, root / "images"):
                path = folder / f"{split}{year}"
                if path.is_dir():
                    found.image_dirs[(split, year)] = path
                    break
    for pattern in ("dataset_coco.json", "*/dataset_coco.json", "*/*/dataset_coco.json"):
        hits = sorted(root.glob(pattern))
        if hits:
            found.karpathy = hits[0]
            break
    return found


def resolve_style(sources: CocoSources, style: str) -> str:
    if style not in SPLIT_STYLES:
        raise CocaError(f"unknown split style '{style}' (use {', '.join(SPLIT_STYLES)})")
    if style == "auto":
        style = "karpathy" if sources.karpathy else "official"
    if style == "karpathy" and sources.karpathy is None:
        raise CocaError(f"no Karpathy split file (dataset_coco.json) under {sources.root}: put it there, add "
                        "--download, or use --split-style official")
    if style == "official" and not sources.annotations:
        raise CocaError(f"no COCO caption annotations under {sources.root} (expected "
                        "annotations/captions_{train,val}{2014,2017}.json; found " + sources.describe() +
                        "); add --download to fetch them")
    return style


def clean_caption(text) -> str:
    """One line of text: tabs, newlines and runs of spaces become single spaces."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Splits: which image goes where, with which captions
# --------------------------------------------------------------------------------------------

@dataclass
class Entry:
    image: Path
    captions: list[str]
    image_id: Optional[int] = None


class _ImageIndex:
    """Existence checks by listing each image folder once (COCO folders hold ~100k files)."""

    def __init__(self):
        self._listed: dict[Path, set[str]] = {}

    def exists(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._listed:
            try:
                self._listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                self._listed[folder] = set()
        return path.name in self._listed[folder]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CocaError(f"cannot read {path}: {err}") from None


def _official_entries(sources: CocoSources, split: str, year: str) -> list[Entry]:
    path = sources.annotations[(split, year)]
    data = _read_json(path)
    try:
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    except (KeyError, TypeError, ValueError) as err:
        raise CocaError(f"{path} is not a COCO captions file (missing {err})") from None
    folder = sources.image_dirs.get((split, year), sources.root / f"{split}{year}")
    return [Entry(folder / name, captions[i], i) for i, name in images if i in captions]


def _karpathy_entries(sources: CocoSources, year: Optional[str]) -> dict[str, list[Entry]]:
    data = _read_json(sources.karpathy)
    if year is None:  # the file names are 2014's; use 2017's copies only when 2014's are absent
        has_2014 = any(y == "2014" for _, y in sources.image_dirs)
        has_2017 = any(y == "2017" for _, y in sources.image_dirs)
        year = "2017" if has_2017 and not has_2014 else "2014"
    index = _ImageIndex()
    out: dict[str, list[Entry]] = {s: [] for s in KARPATHY_SPLITS}
    try:
        for im in data["images"]:
            split = {"restval": "train"}.get(im["split"], im["split"])
            if split not in out:
                continue
            cocoid = int(im.get("cocoid", im.get("imgid", -1)))
            if year == "2014":
                folder = sources.image_dirs.get((im["filepath"].replace("2014", ""), "2014"),
                                                sources.root / im["filepath"])
                image = folder / im["filename"]
            else:
                name = f"{cocoid:012d}.jpg"
                candidates = [sources.image_dirs.get((s, "2017"), sources.root / f"{s}2017") / name
                              for s in ("val", "train")]
                image = next((c for c in candidates if index.exists(c)), candidates[1])
            out[split].append(Entry(image, [s["raw"] for s in im["sentences"]], cocoid))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CocaError(f"{sources.karpathy} is not a Karpathy split file (missing {err})") from None
    return out


def build_splits(sources: CocoSources, style: str, year: Optional[str] = None,
                 splits: Optional[Iterable[str]] = None) -> dict[str, list[Entry]]:
    """{name: entries}: names ``karpathy_{train,val,test}`` or ``{train,val}{year}``."""
    style = resolve_style(sources, style)
    if year is not None and year not in YEARS:
        raise CocaError(f"unknown COCO release '{year}' (use {' or '.join(YEARS)})")
    wanted = _check_splits(style, splits)
    if style == "karpathy":
        return {f"karpathy_{s}": entries for s, entries in _karpathy_entries(sources, year).items() if s in wanted}
    years = [year] if year else sources.years
    out = {}
    for y in years:
        for s in OFFICIAL_SPLITS:
            if s in wanted and (s, y) in sources.annotations:
                out[f"{s}{y}"] = _official_entries(sources, s, y)
    if not out:
        raise CocaError(f"no caption annotations for {' and '.join(sorted(wanted))} {year or ''} under "
                        f"{sources.root} (found {sources.describe()})".replace("  ", " "))
    return out


def _check_splits(style: str, splits: Optional[Iterable[str]]) -> set[str]:
    known = KARPATHY_SPLITS if style == "karpathy" else OFFICIAL_SPLITS
    if splits is None:
        return set(known)
    wanted = {s.strip() for s in splits if s.strip()}
    unknown = wanted - set(known)
    if unknown or not wanted:
        raise CocaError(f"unknown split '{', '.join(sorted(unknown)) or ''}' for the {style} split style "
                        f"(use {', '.join(known)})")
    return wanted


# --------------------------------------------------------------------------------------------
# Writing TSVs and shards
# --------------------------------------------------------------------------------------------

@dataclass
class SplitReport:
    name: str
    tsv: Path
    images: int = 0  # written
    captions: int = 0  # written
    missing: list[Path] = field(default_factory=list)  # images not on disk: not written
    empty_captions: int = 0  # captions that were blank: not written
    shards: list[Path] = field(default_factory=list)


def _write_then_rename(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file beside ``path``, then it is renamed: a file under its
    final name is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tsv(rows: list[tuple[str, str]], path: Path) -> None:
    """``filepath<TAB>title`` with a header."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(TSV_COLUMNS))
    _write_then_rename(path, lambda tmp: frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n"))


def write_shards(entries: list[Entry], folder: Path, prefix: str, shard_size: int,
                 progress: Optional[ProgressFn] = None) -> list[Path]:
    """webdataset shards ``{prefix}-000000.tar``...: one sample per image, ``{key}.jpg`` (the file
    as it is), ``{key}.txt`` (its first caption) and ``{key}.json`` (all captions, image id, file name).

    ``{folder}/sizes.json`` gives each shard's sample count, so that ``coca train --data folder``
    knows the epoch length. A rerun (say with another ``shard_size``) replaces the set: the old
    sizes.json goes first, so that no count can describe a rewritten shard, and once the new one
    is written, shards under ``prefix`` that it does not list are removed.
    """
    if shard_size < 1:
        raise CocaError("--shard-size must be at least 1")
    sizes_file = folder / SIZES_FILE
    sizes_file.unlink(missing_ok=True)
    sizes: dict[str, int] = {}
    for start in range(0, len(entries), shard_size):
        chunk = entries[start:start + shard_size]
        path = folder / f"{prefix}-{start // shard_size:06d}.tar"
        _write_then_rename(path, lambda tmp: _write_tar(tmp, chunk, start, len(entries), prefix, progress))
        sizes[path.name] = len(chunk)
    _write_then_rename(sizes_file, lambda tmp: tmp.write_text(json.dumps(sizes, indent=1) + "\n"))
    ours = re.compile(rf"{re.escape(prefix)}-\d+\.tar(\.tmp)?")  # .tmp: left by a run that was killed
    for stale in sorted(folder.iterdir()):
        if ours.fullmatch(stale.name) and stale.name not in sizes:
            stale.unlink()
    return [folder / name for name in sizes]


def _write_tar(path: Path, entries: list[Entry], first: int, total: int, prefix: str,
               progress: Optional[ProgressFn]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, entry in enumerate(entries, first):
            key = entry.image.stem.replace(".", "_")
            meta = {"image_id": entry.image_id, "filename": entry.image.name, "captions": entry.captions}
            suffix = entry.image.suffix.lower().lstrip(".") or "jpg"
            _add(tar, f"{key}.{suffix}", entry.image.read_bytes())
            _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
            _add(tar, f"{key}.txt", entry.captions[0].encode())
            if progress:
                progress(prefix, i + 1, total)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def prepare_coco(root: Path, output: Optional[Path] = None, style: str = "auto", year: Optional[str] = None,
                 absolute: bool = False, splits: Optional[Iterable[str]] = None, shards: Optional[Path] = None,
                 shard_size: int = 5000, progress: Optional[ProgressFn] = None) -> list[SplitReport]:
    """Write ``{output}/{split}.tsv`` for every split (and shards in ``{shards}/{split}/``).

    Images missing from disk are left out and listed in each report's ``missing``; blank
    captions are left out and counted. Relative paths are relative to the TSV's folder.
    """
    sources = find_coco(root)
    output = Path(output).expanduser() if output is not None else sources.root
    built = build_splits(sources, style, year, splits)
    reports = []
    index = _ImageIndex()
    folders: dict[Path, str] = {}  # image folder -> how the TSV names it

    def tsv_path(image: Path, tsv: Path) -> str:
        if image.parent not in folders:
            folder = image.parent.resolve()
            if not absolute:
                folder = Path(os.path.relpath(folder, tsv.parent.resolve()))
            folders[image.parent] = "" if str(folder) == "." else folder.as_posix() + "/"
        return folders[image.parent] + image.name

    for name, entries in built.items():
        tsv = output / f"{name}.tsv"
        report = SplitReport(name, tsv)
        rows, present = [], []
        for entry in entries:
            if not index.exists(entry.image):
                report.missing.append(entry.image)
                continue
            captions = [clean_caption(c) for c in entry.captions]
            report.empty_captions += sum(1 for c in captions if not c)
            captions = [c for c in captions if c]
            if not captions:
                continue
            image = tsv_path(entry.image, tsv)
            rows += [(image, c) for c in captions]
            present.append(Entry(entry.image, captions, entry.image_id))
        write_tsv(rows, tsv)
        report.images, report.captions = len(present), len(rows)
        if shards is not None and present:
            report.shards = write_shards(present, Path(shards).expanduser() / name, name, shard_size, progress)
        reports.append(report)
    return reports


# --------------------------------------------------------------------------------------------
# Downloading: resumable, size-checked, extracted atomically
# --------------------------------------------------------------------------------------------

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
    wanted = _check_splits(style, splits)
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
    interrupted transfer leaves the ``.part`` file for the next call to continue.
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
        length = response.headers.get("Content-Length")
        if response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != have:
                raise CocaError(f"cannot resume {url}: the server sent bytes from {start}, not {have}", exit_code=1)
            total = int(length) + have if length is not None else None
            mode = "ab"
        else:  # 200: the whole file (the server ignored or does not support ranges)
            have, mode = 0, "wb"
            total = int(length) if length is not None else None
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
    target = (folder / name).resolve()
    if not target.is_relative_to(folder.resolve()):
        raise CocaError(f"{archive.name} holds an unsafe path ({name}); not extracted", exit_code=1)
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
