"""Results for webdataset shards (captions, scores): one JSON Lines file per shard, shards split
across processes.

A shard's output is written to ``NAME.jsonl.part`` and renamed when the shard was read to its
end-of-archive marker, so a finished file means a whole shard: an interrupted run redoes only
unfinished shards, and a shard cut short or damaged (BrokenShard) gets no file and is retried.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.shards import BrokenShard, transformed_samples
from ..errors import writing
from .captioning import caption_batch


def shard_output(output: Path, shard: str) -> Path:
    name = Path(shard).name
    return output / f"{name[:-4] if name.endswith('.tar') else name}.jsonl"


def my_shards(shards: list[str], output: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """This process's share of the shards not yet captioned (round-robin over ranks)."""
    return [s for s in shards[rank::world_size] if not shard_output(output, s).exists()]


@dataclass
class ShardReport:
    shard: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def line(self, done: str) -> str:
        """'NAME.tar: 3 captioned, skipped 1 no image' (``done``: what was done to the samples)."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return f"{Path(self.shard).name}: {self.written} {done}" + (f", skipped {skipped}" if skipped else "")


Results = Callable[[list[str], torch.Tensor, list], list[dict]]


def shard_records(shard: str, output: Path, transform: Callable, batch_size: int,
                  results: Results, captions: bool = False) -> ShardReport:
    """Write ``results(keys, images, captions)``, one record per key, for every usable sample of
    ``shard`` into ``output/NAME.jsonl``, a batch at a time. ``captions``: the samples' own captions
    are read (a sample without one is skipped); else they are None.

    Raises BrokenShard, leaving no file, when the shard is cut short or damaged.
    """
    report = ShardReport(shard)
    target = shard_output(output, shard)
    partial = target.with_name(target.name + ".part")

    def flush(batch, out):
        keys, images, texts = zip(*batch)
        for record in results(list(keys), torch.stack(images), list(texts)):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        report.written += len(keys)

    output.mkdir(parents=True, exist_ok=True)
    try:
        with writing(partial), open(partial, "w", encoding="utf-8") as out:
            batch = []
            for sample in transformed_samples(shard, transform, report.skipped, captions):
                batch.append(sample)
                if len(batch) == batch_size:
                    flush(batch, out)
                    batch = []
            if batch:
                flush(batch, out)
    except BrokenShard:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return report


def caption_shard(model, transform: Callable, shard: str, output: Path, batch_size: int = 32,
                  **caption_options) -> ShardReport:
    """Caption every image of ``shard`` into ``output/NAME.jsonl`` ({"key", "caption"} per line, and
    what :func:`~.captioning.caption_batch` adds with ``caption_options``).

    Raises BrokenShard, leaving no file, when the shard is cut short or damaged.
    """
    def results(keys, images, _):
        return [{"key": key, **caption.fields()} for key, caption in
                zip(keys, caption_batch(model, images, keys, **caption_options))]

    return shard_records(shard, output, transform, batch_size, results)
