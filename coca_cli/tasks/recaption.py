"""Recaptioning webdataset shards: one JSON Lines file per shard, shards split across processes.

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
from typing import Callable, Iterator, Optional

import torch

from ..data.samples import SkipSample, decode_image, failing_on
from ..data.shards import BrokenShard, image_of, tar_samples
from ..data.tokenizer import decode
from ..errors import writing


def shard_output(output: Path, shard: str) -> Path:
    name = Path(shard).name
    return output / f"{name[:-4] if name.endswith('.tar') else name}.jsonl"


def my_shards(shards: list[str], output: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """This process's share of the shards not yet captioned (round-robin over ranks)."""
    return [s for s in shards[rank::world_size] if not shard_output(output, s).exists()]


@dataclass
class ShardReport:
    shard: str
    captioned: int = 0
    skipped: Counter = field(default_factory=Counter)


def _images(shard: str, transform: Callable, skipped: Counter) -> Iterator[tuple[str, torch.Tensor]]:
    for sample in tar_samples(shard):
        try:
            data = image_of(sample)
            with failing_on(f"sample {sample['__key__']} of {sample['__url__']}"):
                image = transform(decode_image(data))
        except SkipSample as reason:
            skipped[str(reason)] += 1
            continue
        yield sample["__key__"], image


def caption_shard(model, transform: Callable, shard: str, output: Path, batch_size: int = 32,
                  generator: Optional[torch.Generator] = None, **generate_kwargs) -> ShardReport:
    """Caption every image of ``shard`` into ``output/NAME.jsonl`` ({"key", "caption"} per line).

    Raises BrokenShard, leaving no file, when the shard is cut short or damaged.
    """
    report = ShardReport(shard)
    target = shard_output(output, shard)
    partial = target.with_name(target.name + ".part")
    param = next(model.parameters())

    def flush(keys, images, out):
        batch = torch.stack(images).to(device=param.device, dtype=param.dtype)
        tokens = model.generate(batch, generator=generator, **generate_kwargs)
        for key, ids in zip(keys, tokens.tolist()):
            out.write(json.dumps({"key": key, "caption": decode(ids)}, ensure_ascii=False) + "\n")
        report.captioned += len(keys)

    output.mkdir(parents=True, exist_ok=True)
    try:
        with writing(partial), open(partial, "w", encoding="utf-8") as out:
            keys, images = [], []
            for key, image in _images(shard, transform, report.skipped):
                keys.append(key)
                images.append(image)
                if len(keys) == batch_size:
                    flush(keys, images, out)
                    keys, images = [], []
            if keys:
                flush(keys, images, out)
    except BrokenShard:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return report
