"""Caption evaluation: references from a TSV, captions generated or read from a file, COCO metrics."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .caption_metrics import METRIC_NAMES, score_captions
from ..errors import CocaError, reading
from ..data.tables import read_pairs, read_rows
from .captioning import parse_caption_line


@dataclass
class References:
    """The reference captions of each image, images in the file's order."""

    images: list[Path]  # as read: the TSV's folder joined with its filepath column
    captions: dict[Path, list[str]]

    def first(self, n: Optional[int]) -> "References":
        images = self.images if n is None else self.images[:n]
        return References(images, {p: self.captions[p] for p in images})


def read_references(path: Path, img_key: str = "filepath", caption_key: str = "title",
                    separator: Optional[str] = None) -> References:
    """Reference captions from a CSV/TSV (``coca prepare-coco``'s files: ``filepath``, ``title``).

    Relative image paths are relative to the file's folder.
    """
    pairs = read_pairs(path, img_key, caption_key, separator)
    captions: dict[Path, list[str]] = {p: [] for p in pairs.images}
    for text, i in zip(pairs.captions, pairs.caption_image):
        captions[pairs.images[i]].append(text)
    return References(list(pairs.images), captions)


def read_predictions(path: Path) -> dict[str, str]:
    """{image: caption} from JSON Lines (``{"image": ..., "caption": ...}`` a line), a CSV or TSV
    with ``image`` and ``caption`` columns, or ``image<TAB>caption`` lines (.txt, fields escaped as
    ``coca caption`` writes them) — the files ``coca caption --output`` writes."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}

    def add(image, caption, line: int):
        if not isinstance(image, str) or not image.strip() or not isinstance(caption, str):
            raise CocaError(f"{path}, line {line}: expected an image path and a caption (strings)")
        if image in out:
            raise CocaError(f"{path}, line {line}: {image} already has a caption (line {first_line[image]})")
        out[image], first_line[image] = caption, line

    if suffix in (".csv", ".tsv"):
        for line, (image, caption) in read_rows(path, ("image", "caption")):
            add(image, caption, line)
    else:
        with reading(path), open(path, encoding="utf-8-sig", newline="") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                add(*parse_caption_line(text, "txt" if suffix == ".txt" else "jsonl", f"{path}, line {line}"), line)
    if not out:
        raise CocaError(f"no captions in {path}")
    return out


def match_predictions(references: References, predictions: dict[str, str], base: Optional[Path] = None
                      ) -> tuple[dict[Path, str], list[str]]:
    """Pair each predicted caption with a reference image: by the same path (as written, or
    relative to ``base``, the predictions file's folder, or the working directory), else by a
    file name that is unique among the references. Returns (matched, unmatched image names)."""
    by_path: dict[str, Path] = {}
    for image in references.images:
        by_path.setdefault(str(image), image)
        by_path.setdefault(os.path.normpath(os.path.abspath(image)), image)
    names: dict[str, Optional[Path]] = {}
    for image in references.images:
        names[image.name] = None if image.name in names else image
    matched: dict[Path, str] = {}
    unmatched = []
    for name, caption in predictions.items():
        candidates = [name, os.path.normpath(os.path.abspath(name))]
        if base is not None:
            candidates.append(os.path.normpath(os.path.abspath(Path(base) / name)))
        image = next((by_path[c] for c in candidates if c in by_path), None) or names.get(Path(name).name)
        if image is None or image in matched:
            unmatched.append(name)
        else:
            matched[image] = caption
    return matched, unmatched


def evaluate_captions(references: References, captions: dict[Path, str], java: bool = True) -> dict:
    """Score the captions of the images in ``captions`` against all their references.

    Returns {"metrics", "unavailable", "per_image": [{"image", "caption", "references", "scores"}]}.
    """
    images = [p for p in references.images if p in captions]
    if not images:
        raise CocaError("no image has both a caption and references", exit_code=1)
    scored = score_captions({i: references.captions[i] for i in images}, {i: captions[i] for i in images}, java=java)
    per_image = [{"image": str(i), "caption": captions[i], "references": references.captions[i],
                  "scores": {k: _finite(v) for k, v in scored["per_image"][i].items()}} for i in images]
    return {"metrics": {k: _finite(v) for k, v in scored["metrics"].items()}, "unavailable": scored["unavailable"],
            "per_image": per_image}


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(metric, score x100 or "n/a") in the usual order."""
    return [(name, "n/a" if metrics.get(name) is None else f"{100 * metrics[name]:.2f}") for name in METRIC_NAMES]
