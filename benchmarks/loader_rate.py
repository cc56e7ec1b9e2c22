"""Samples/s of ``coca train``'s shard loader, for bench.py's loader task.

bench.py runs it as a script, each measure in a fresh process that imports nothing but the
checkout named (this one, or the package as it was when an issue was filed, to run side by
side with today's: ``bench.py --loader-baseline DIR``):

    git worktree add /tmp/before 85d07a5      # the package when issue 14 was filed
    python benchmarks/loader_rate.py --package /tmp/before SHARDS WORKERS BATCH SAMPLES
    python benchmarks/loader_rate.py --package . --decode previous SHARDS WORKERS BATCH SAMPLES
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path


def loader_rate(spec: str, workers: int, batch: int, samples: int, size: int = 224,
                on_device: bool = False) -> tuple[int, float]:
    """(samples, samples/s) of TrainData over the shards ``spec`` with ``workers`` (0: in this
    process), after its first batch, taken as the training loop takes them: normalised float32
    (a batch of uint8 crops is converted in this process, inside the timing, into the loop's
    reused buffer where the checkout has one). With ``on_device`` uint8 crops are left for the
    training device to normalise, as a GPU trainer takes them."""
    import torch
    from coca_cli.data import transforms
    from coca_cli.data.datasets import DataConfig, TrainData
    from coca_cli.data.tokenizer import tokenize

    cfg = DataConfig(spec, workers=workers, batch_size=batch, num_samples=samples, shuffle_buffer=batch)
    data = TrainData(cfg, transforms.image_transform(size, is_train=True), partial(tokenize, context_length=77))
    buffers = transforms.BatchBuffers() if hasattr(transforms, "BatchBuffers") else None
    batches = data.epoch(0)
    next(batches)  # warm-up: workers started and filling
    start, count = time.perf_counter(), 0
    for b in batches:
        if on_device:
            count += len(b.images)
        else:
            count += len(buffers.to(b.images, "cpu", torch.float32) if buffers else b.images.to("cpu", torch.float32))
    rate = count / (time.perf_counter() - start)
    batches.close()
    return count, rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="a checkout of this repository whose loader to run")
    parser.add_argument("spec", help="shards, as --data takes them")
    parser.add_argument("workers", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("samples", type=int)
    parser.add_argument("--decode", choices=("new", "previous"), default="new",
                        help="previous: every JPEG decoded whole (REDUCED_DECODE off), as before issue 14")
    parser.add_argument("--on-device", action="store_true",
                        help="leave uint8 batches for the training device to normalise, as a GPU trainer takes them")
    args = parser.parse_args(argv)
    root = Path(args.package).resolve()
    sys.path.insert(0, str(root))
    try:
        import coca_cli
    except ImportError:
        coca_cli = None
    if coca_cli is None or Path(coca_cli.__file__).resolve().parent.parent != root:
        parser.error(f"{root} is not a checkout of this repository (no coca_cli package in it)")
    if args.decode == "previous":
        from coca_cli.data import transforms

        if not hasattr(transforms, "REDUCED_DECODE"):
            parser.error(f"{root} has no reduced decode to turn off: its loader is the previous one already")
        transforms.REDUCED_DECODE = False  # the loader's workers are forked after this: they inherit it
    count, rate = loader_rate(args.spec, args.workers, args.batch, args.samples, on_device=args.on_device)
    print(json.dumps({"samples": count, "per_s": rate}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
