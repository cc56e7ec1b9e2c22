"""Scoring image-caption tables and shards (the "CLIP score" used to filter pre-training data,
defined in :func:`.embeddings.similarity`), and filtering them by it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..data.images import iter_batches
from ..data.shards import SIZES_FILE, copy_samples, write_sizes
from ..data.tables import column_indexes, column_separator, image_path, read_whole_rows
from ..errors import CocaError, reading
from ..files import atomic_write, claim_folder
from .embeddings import score_texts
from .recaption import ShardReport, shard_output, shard_records


def selected(scores: Sequence[Optional[float]], min_score: Optional[float] = None,
             top_fraction: Optional[float] = None) -> list[bool]:
    """Which entries a filter keeps: those scoring at least ``min_score``, or the
    ``round(top_fraction * scored)`` best (the earlier on equal scores). Entries without a score
    (None: the image or caption could not be read) are never kept; with no filter all others are."""
    if top_fraction is None:
        return [score is not None and (min_score is None or score >= min_score) for score in scores]
    scored = [i for i, score in enumerate(scores) if score is not None]
    best = sorted(scored, key=lambda i: -scores[i])[:round(top_fraction * len(scored))]  # sorted() is stable
    keep = [False] * len(scores)
    for i in best:
        keep[i] = True
    return keep


# -- tables --------------------------------------------------------------------------------------

@dataclass
class ScoreTable:
    """A CSV/TSV of image paths and captions, every field kept, to be written again with a score."""

    path: Path
    header: list[str]
    lines: list[int]  # where each row starts in the file
    rows: list[list[str]]
    images: list[Path]  # each row's image (relative paths resolved as `coca train` does)
    captions: list[str]


def read_score_table(path: Path, img_key: str, caption_key: str, separator: Optional[str],
                     column: str) -> ScoreTable:
    """The table to score; it must not have the ``column`` the scores will go in already."""
    path = Path(path).expanduser()
    header, rows = read_whole_rows(path, separator)
    image_at, caption_at = column_indexes(path, header, (img_key, caption_key), choose="--img-key and --caption-key")
    if column in header:
        raise CocaError(f"{path} already has a column '{column}': name the scores' column with --column")
    if not rows:
        raise CocaError(f"{path} has no rows")
    fields = [row for _, row in rows]
    return ScoreTable(path, header, [line for line, _ in rows], fields,
                      [Path(image_path(row[image_at], path)) for row in fields], [row[caption_at].strip() for row in fields])


def check_table_output(output: Path, table: Path, column: str) -> None:
    """Before any model loads: the scored table is a .csv or .tsv that is not the input, and an
    existing file there is replaced only when it is a scored table (its last column ``column``)."""
    if Path(output).suffix.lower() not in (".csv", ".tsv"):
        raise CocaError(f"--output {output}: a scored table is written as .csv or .tsv")
    if output.is_dir():
        raise CocaError(f"--output {output} is a folder; give the scored table's file name")
    if not output.is_file() or output.stat().st_size == 0:
        return
    if output.resolve() == Path(table).expanduser().resolve():
        raise CocaError(f"--output {output} is the input table: write the scored table to another file")
    with reading(output, "--output"), open(output, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter=column_separator(output)), [])
    if not header or header[-1] != column:
        raise CocaError(f"--output {output} exists and is not a table coca scored (its last column is not "
                        f"'{column}'): not replacing it (move it away or choose another name)")


def iter_table_scores(model, transform: Callable, tokenizer: Callable, table: ScoreTable, batch_size: int = 32,
                      workers: int = 0) -> Iterator[list[tuple[Optional[float], Optional[str]]]]:
    """(score, None) or (None, why it has none) for each row of ``table``, in order, a batch at a time."""
    start = 0
    for batch in iter_batches(table.images, transform, batch_size, workers):
        rows = range(start, start + len(batch.paths) + len(batch.failures))  # a batch is the next rows, in order
        start = rows.stop
        loaded = {path: i for i, path in enumerate(batch.paths)}
        usable = [row for row in rows if table.images[row] in loaded and table.captions[row]]
        scores = {}
        if usable:
            images = batch.images[[loaded[table.images[row]] for row in usable]]
            texts = [[table.captions[row]] for row in usable]
            values = score_texts(model, tokenizer, images, texts, [table.images[row] for row in usable])[:, 0]
            scores = dict(zip(usable, values.tolist()))
        reasons = dict(batch.failures)
        yield [(scores[row], None) if row in scores else (None, reasons.get(table.images[row], "no caption"))
               for row in rows]


def write_scored_table(table: ScoreTable, scores: Sequence[Optional[float]], keep: Sequence[bool], output: Path,
                       column: str) -> None:
    """``table`` with a last column of scores (empty where none), the rows ``keep`` marks only, as
    CSV (.csv) or TSV; written whole or not at all."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            rows = csv.writer(f, delimiter=column_separator(output), lineterminator="\n")
            rows.writerow([*table.header, column])
            rows.writerows([*row, "" if score is None else score]
                           for row, score, kept in zip(table.rows, scores, keep) if kept)

    atomic_write(output, write)


# -- shards --------------------------------------------------------------------------------------

def filtered_shard(output: Path, shard: str) -> Path:
    """Where the samples of ``shard`` that a filter keeps are written."""
    return shard_output(output, shard).with_suffix(".tar")


def check_shard_output(output: Path, shards: Sequence[str]) -> None:
    """Before any model loads: ``output`` is a folder of coca's score files and filtered shards
    (see :func:`~coca_cli.files.claim_folder`) and holds none of the input shards."""
    ours = {SIZES_FILE}
    for shard in shards:
        scores = shard_output(output, shard)
        ours |= {scores.name, scores.name + ".part", filtered_shard(output, shard).name}
    claim_folder(output, ours)
    inside = [s for s in shards if Path(s).exists() and Path(s).resolve().parent == Path(output).resolve()]
    if inside:
        raise CocaError(f"--output {output} holds the input shards ({Path(inside[0]).name}): "
                        "write the scores and filtered shards to another folder")


def score_shard(model, transform: Callable, tokenizer: Callable, shard: str, output: Path,
                batch_size: int = 32) -> ShardReport:
    """Score every sample of ``shard`` with its own caption into ``output/NAME.jsonl`` ({"key",
    "score"} a line). Raises BrokenShard, leaving no file, when the shard is cut short or damaged."""
    def results(keys, images, captions):
        scores = score_texts(model, tokenizer, images, [[caption] for caption in captions], keys)[:, 0]
        return [{"key": key, "score": score} for key, score in zip(keys, scores.tolist())]

    return shard_records(shard, output, transform, batch_size, results, captions=True)


def read_shard_scores(output: Path, shard: str) -> dict[str, float]:
    """{key: score} from the scores :func:`score_shard` wrote for ``shard``."""
    path = shard_output(output, shard)
    scores = {}
    with reading(path, "scores file"), open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
                scores[str(record["key"])] = float(record["score"])
            except (ValueError, KeyError, TypeError):
                raise CocaError(f"{path}, line {number}: expected a JSON object with a key and a score "
                                "(remove the file to score the shard again)") from None
    return scores


def write_filtered_shards(output: Path, shards: Sequence[str], min_score: Optional[float] = None,
                          top_fraction: Optional[float] = None) -> tuple[int, int]:
    """The samples of every shard that the filter keeps (see :func:`selected`), over all the
    shards together, as shards of the same names in ``output`` with their ``sizes.json``; each
    sample's files are copied as they were. Returns (samples kept, samples scored)."""
    per_shard = [read_shard_scores(output, shard) for shard in shards]
    flat = [(i, key, score) for i, scores in enumerate(per_shard) for key, score in scores.items()]
    keep = selected([score for _, _, score in flat], min_score, top_fraction)
    kept_keys: list[set[str]] = [set() for _ in shards]
    for (i, key, _), kept in zip(flat, keep):
        if kept:
            kept_keys[i].add(key)
    sizes = {}
    for shard, keys in zip(shards, kept_keys):
        target = filtered_shard(output, shard)
        sizes[target.name] = copy_samples(shard, target, keys.__contains__)
    write_sizes(output, sizes)
    return sum(sizes.values()), len(flat)
