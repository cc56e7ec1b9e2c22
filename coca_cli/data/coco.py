"""MS COCO captions: finding a download, building its splits, writing training/evaluation files.

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
--data``). Fetching the official archives is :mod:`.coco_download`'s job.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import CocaError
from ..files import atomic_write

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

    @cached_property
    def _trusted_folders(self) -> list[Path]:
        """The root and the image folders found in it (which may be symlinks to elsewhere: the
        layout is the user's, unlike the paths the annotation files name), fully resolved."""
        return [Path(os.path.realpath(p)) for p in (self.root, *self.image_dirs.values())]

    def holds(self, path: Path) -> bool:
        """Whether ``path``, with ``..`` and symlinks resolved, lies inside the root or one of its
        image folders: annotation files come from the network and may name any file."""
        return resolves_inside(path, self._trusted_folders)


def resolves_inside(path: Path, folders: list[Path]) -> bool:
    """Whether the real location of ``path`` lies in one of ``folders`` (already resolved)."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):  # a NUL byte in the name
        return False
    return any(real.is_relative_to(folder) for folder in folders)


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
    wanted = check_splits(style, splits)
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


def check_splits(style: str, splits: Optional[Iterable[str]]) -> set[str]:
    """The splits asked for (all of the style's when None), refusing names the style does not have."""
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
    outside: list[Entry] = field(default_factory=list)  # paths leading outside the root: not read, not written
    empty_captions: int = 0  # captions that were blank: not written
    shards: list[Path] = field(default_factory=list)


def write_tsv(rows: list[tuple[str, str]], path: Path) -> None:
    """``filepath<TAB>title`` with a header."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(TSV_COLUMNS))
    atomic_write(path, lambda tmp: frame.to_csv(tmp, sep="\t", index=False, lineterminator="\n"))


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
        atomic_write(path, lambda tmp: _write_tar(tmp, chunk, start, len(entries), prefix, progress))
        sizes[path.name] = len(chunk)
    atomic_write(sizes_file, lambda tmp: Path(tmp).write_text(json.dumps(sizes, indent=1) + "\n"))
    shard = rf"{re.escape(prefix)}-\d+\.tar"
    ours = re.compile(rf"{shard}|\.{shard}\.\w+\.tmp")  # .tmp: atomic_write's, left by a run that was killed
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

    Images missing from disk are left out and listed in each report's ``missing``, paths that
    lead outside the root (``..``, absolute, symlinks) in ``outside``; blank captions are left
    out and counted. Relative paths are relative to the TSV's folder.
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
            if not sources.holds(entry.image):
                report.outside.append(entry)
                continue
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
