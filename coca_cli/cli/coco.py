"""`coca prepare-coco`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import CocaError
from . import app, err_console


class _ByteProgress:
    """Rich progress bars on stderr for downloads (bytes) and shard writing (images)."""

    def __init__(self):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.tasks: dict[str, int] = {}

    def __call__(self, label: str, done: int, total: Optional[int]) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done, total=total)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()


class _CountProgress(_ByteProgress):
    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("writing shards {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.tasks = {}


@app.command("prepare-coco")
def prepare_coco_command(
    root: Path = typer.Option(..., "--root", "-r", help="COCO folder: annotations/captions_*{2014,2017}.json, the "
                              "image folders (train2014/ ...) and, for Karpathy's split, dataset_coco.json."),
    split_style: str = typer.Option("auto", "--split-style", help="karpathy (train incl. restval / val / test, what "
                                    "papers report), official (train / val of each release found), or auto "
                                    "(karpathy when dataset_coco.json is there)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Only these splits, comma separated (e.g. val,test); "
                                         "--download then fetches only the images they need."),
    year: Optional[str] = typer.Option(None, "--year", help="2014 or 2017: which release's files to use "
                                       "[default: every release found; 2014 for --download]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for the TSV files [default: --root]."),
    absolute: bool = typer.Option(False, "--absolute", help="Write absolute image paths (default: relative to the "
                                  "TSV's folder; open_clip's own loader wants absolute ones)."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="Also write webdataset shards: a folder per split "
                                          "here (e.g. SHARDS/train2014/) with a sizes.json, ready for `coca train "
                                          "--data SHARDS/train2014/`. One sample per image: .jpg, .txt (first "
                                          "caption), .json (all captions). A rerun replaces a split's shards."),
    shard_size: int = typer.Option(5000, "--shard-size", min=1, help="Images per shard."),
    download: bool = typer.Option(False, "--download", help="First fetch whatever of the official archives (and "
                                  "Karpathy's split) is not under --root yet; resumes partial downloads."),
    base_url: str = typer.Option("http://images.cocodataset.org", "--base-url", help="Where the COCO archives are "
                                 "(zips/ and annotations/ below it)."),
    karpathy_url: str = typer.Option("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                                     "--karpathy-url", help="Zip holding dataset_coco.json."),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep the downloaded zip files after "
                                       "extracting them."),
):
    """Turn a COCO download into caption TSVs (filepath, title; one row per caption) and shards.

    Images listed in the annotations but missing on disk, or whose paths lead outside --root
    (.., absolute paths, symlinks to elsewhere), are left out and reported (exit 1).

    \b
    Example: coca prepare-coco --root data/coco
             coca prepare-coco --root data/coco --download --splits val,test
             coca prepare-coco --root data/coco --split-style official --shards data/coco/shards
             coca train --model coca_ViT-B-32 --data data/coco/shards/train2014/
    """
    from ..data.coco import prepare_coco
    from ..data.coco_download import COCO_BASE_URL, coco_archives, fetch_coco

    wanted = splits.split(",") if splits is not None else None
    if split_style not in ("auto", "karpathy", "official"):
        raise CocaError(f"unknown split style '{split_style}' (use auto, karpathy or official)")
    if download:
        root.mkdir(parents=True, exist_ok=True)
        style = "karpathy" if split_style == "auto" else split_style
        archives = coco_archives(year or "2014", style, wanted, base_url or COCO_BASE_URL, karpathy_url)
        with _ByteProgress() as bar:
            fetch_coco(root, archives, keep_archives=keep_archives, progress=bar,
                       log=lambda msg: err_console.print(msg))
        split_style = style
    with _CountProgress() as bar:
        reports = prepare_coco(root, output, split_style, year, absolute, wanted, shards, shard_size, progress=bar)
    missing = outside = 0
    for r in reports:
        line = f"{r.tsv}: {r.images} images, {r.captions} captions"
        if r.shards:
            line += f"; {len(r.shards)} shards in {r.shards[0].parent}/"
        err_console.print(line)
        if r.empty_captions:
            err_console.print(f"{r.name}: {r.empty_captions} blank captions left out")
        if r.missing:
            missing += len(r.missing)
            total = len(r.missing) + r.images
            err_console.print(f"{r.name}: {len(r.missing)} of {total} images not found, left out (first: "
                              f"{r.missing[0]})")
        for entry in r.outside:  # quoted: the annotation file chose the name, newlines and all
            err_console.print(f"{r.name}: image {entry.image_id} left out: {str(entry.image)!r} leads outside {root}")
        outside += len(r.outside)
    problems = []
    if missing:
        problems.append(f"{missing} images listed in the annotations are missing under {root}")
    if outside:
        problems.append(f"{outside} image paths in the annotations lead outside {root}, left out")
    if problems:
        raise CocaError("; ".join(problems), exit_code=1)
