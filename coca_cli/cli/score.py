"""`coca score`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from ..errors import CocaError
from . import app, command_line, err_console, progress
from .classify import load_contrastive, with_defaults
from .options import (BatchSizeOption, CaptionKeyOption, ContrastivePretrainedOption, DeviceOption, ImgKeyOption,
                      ModelOption, PrecisionOption, SeparatorOption, WorkersOption)


@app.command("score")
def score_command(
    ctx: typer.Context,
    data: str = typer.Argument(..., help="Image-caption pairs: a .csv/.tsv table (as `coca train --data` reads it) "
                               "or webdataset shards (a folder of .tar, a .tar, a brace pattern or a list joined "
                               "by '::')."),
    output: Path = typer.Option(..., "--output", "-o", help="Table: the scored table (.csv or .tsv). Shards: a "
                                "folder for NAME.jsonl scores per shard and, with a filter, the kept samples as "
                                "NAME.tar shards with sizes.json."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep only the pairs scoring at least this."),
    top_fraction: Optional[float] = typer.Option(None, "--top-fraction", help="Keep only this fraction of the "
                                                 "scored pairs, the highest-scoring (0.3: the best 30%)."),
    column: str = typer.Option("clip_score", "--column", help="Table: the name of the added column."),
    gpus: Optional[int] = typer.Option(None, min=1, help="Shards: processes to split them over (relaunches through "
                                       "torchrun; a filter then runs once, after all are scored) [default: all "
                                       "visible GPUs, 1 on CPU]."),
    img_key: ImgKeyOption = "filepath",
    caption_key: CaptionKeyOption = "title",
    separator: SeparatorOption = None,
    model: ModelOption = None,
    pretrained: ContrastivePretrainedOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "fp32",
    batch_size: BatchSizeOption = 32,
    workers: WorkersOption = 0,
):
    """Score every image-caption pair (the cosine similarity of their embeddings, the "CLIP score"
    used to filter pre-training data) and write it as a column; --min-score or --top-fraction
    keep only the best pairs.

    A table is written again with the scores in a last column (empty where the image could not be
    read). Shards get one NAME.jsonl of {"key", "score"} lines each, kept across runs (a stopped
    run goes on where it was; a later run with a filter reuses them); with a filter the kept
    samples are also written as shards, each sample's files as they were.

    \b
    Examples:
      coca score pairs.csv --output scored.csv
      coca score pairs.tsv --output best.tsv --top-fraction 0.3
      coca score shards/ --output filtered/ --min-score 0.28 --gpus 8
    """
    if min_score is not None and top_fraction is not None:
        raise CocaError("give --min-score or --top-fraction, not both")
    if min_score is not None and not math.isfinite(min_score):
        raise CocaError(f"--min-score must be a finite number, not {min_score}")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise CocaError(f"--top-fraction must be in (0, 1], not {top_fraction}")
    from ..data.datasets import dataset_kind

    options = dict(model=model, pretrained=pretrained, device=device, precision=precision, batch_size=batch_size,
                   workers=workers)
    filtering = min_score is not None or top_fraction is not None
    filters = dict(min_score=min_score, top_fraction=top_fraction) if filtering else None
    if dataset_kind(data) == "csv":
        if gpus is not None and gpus > 1:
            raise CocaError("--gpus splits shards over processes; a table is scored by one")
        return _score_table(Path(data), output, column, img_key, caption_key, separator, filters, **options)
    from ..train.distributed import default_processes, launched, relaunch

    nproc = gpus or default_processes()
    if nproc > 1 and not launched():  # the processes score their shares; the filter needs all of them
        from ..data.shards import resolve_shards
        from ..tasks.scoring import check_shard_output
        from ..weights.factory import prefetch

        shards = resolve_shards(data)
        check_shard_output(output, shards)  # one line (and one download) here, not one in every process
        prefetch(*with_defaults(model, pretrained))
        code = relaunch([*command_line(ctx, drop=("gpus", "min_score", "top_fraction")), "--", data], nproc)
        if code:
            return code
        if filters:
            _filter_shards(output, shards, filters)
        return 0
    return _score_shards(data, output, filters, **options)


def _score_table(data, output, column, img_key, caption_key, separator, filters, model, pretrained, device,
                 precision, batch_size, workers):
    from ..tasks.scoring import check_table_output, iter_table_scores, read_score_table, selected, write_scored_table

    table = read_score_table(data, img_key, caption_key, separator, column)
    check_table_output(output, data, column)
    net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
    scores, failed = [], 0
    with progress(len(table.rows), "scoring") as advance:
        for batch in iter_table_scores(net, transform, tokenizer, table, batch_size, workers):
            for row, (score, reason) in enumerate(batch, start=len(scores)):
                if score is None:
                    failed += 1
                    err_console.print(f"skipped {table.images[row]} ({data}, line {table.lines[row]}): {reason}")
            scores += [score for score, _ in batch]
            advance(len(batch))
    keep = selected(scores, **filters) if filters else [True] * len(scores)
    write_scored_table(table, scores, keep, output, column)
    err_console.print(_summary(sum(keep) if filters else None, len(scores) - failed, filters) + f": wrote {output}")
    if failed:
        raise CocaError(f"{failed} of {len(scores)} pairs could not be scored", exit_code=1)


def _score_shards(data, output, filters, model, pretrained, device, precision, batch_size, workers):
    """This process's share of the shards (every N-th under torchrun or SLURM), then the filter."""
    from ..data.shards import BrokenShard, resolve_shards
    from ..tasks.recaption import my_shards
    from ..tasks.scoring import check_shard_output, score_shard
    from ..train.distributed import process_place, resolve_device

    rank, world_size, local_rank = process_place()
    if filters and world_size > 1:
        raise CocaError("a filter needs the scores of every shard: score them with several processes first, "
                        "then filter in one (or let --gpus launch the processes)")
    shards = resolve_shards(data)
    check_shard_output(output, shards)
    mine, todo = shards[rank::world_size], my_shards(shards, output, rank, world_size)
    broken = 0
    if todo:
        device = str(resolve_device(device, local_rank, world_size > 1))
        net, transform, tokenizer = load_contrastive(model, pretrained, device, precision)
        for shard in todo:
            try:
                report = score_shard(net, transform, tokenizer, shard, output, batch_size)
            except BrokenShard as err:
                broken += 1
                err_console.print(f"{err}: no scores written for it")
                continue
            err_console.print(report.line("scored"))
    if len(todo) < len(mine):
        err_console.print(f"{len(mine) - len(todo)} of {len(mine)} shards were already scored in {output}")
    if broken:
        raise CocaError(f"{broken} of {len(todo)} shards could not be read whole; run again to retry them"
                        + (" (no filtered shards were written)" if filters else ""), exit_code=1)
    if filters:
        _filter_shards(output, shards, filters)


def _filter_shards(output, shards, filters):
    from ..tasks.scoring import write_filtered_shards

    kept, scored = write_filtered_shards(output, shards, **filters)
    err_console.print(_summary(kept, scored, filters) + f": wrote {len(shards)} shards to {output}")


def _summary(kept: Optional[int], scored: int, filters: Optional[dict]) -> str:
    """'kept 30 of 100 scored pairs (the top 0.3)', or 'scored 100 pairs' without a filter."""
    if kept is None:
        return f"scored {scored} pairs"
    rule = (f"score >= {filters['min_score']:g}" if filters["min_score"] is not None
            else f"the top {filters['top_fraction']:g}")
    return f"kept {kept} of {scored} scored pairs ({rule})"
