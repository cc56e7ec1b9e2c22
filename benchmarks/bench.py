"""coca_cli against open_clip 3.3.0, side by side in one run on the same random weights.

    python benchmarks/bench.py                        # CPU: generate (B-32, 2 images), train (B-32, batch 8), loader
    python benchmarks/bench.py --device cuda          # issue 6's H100 cases, bf16 autocast
    python benchmarks/bench.py --task train --model coca_ViT-L-14 --batch 128 --device cuda --json-out r.jsonl

generate: ``model.generate`` with the beam search defaults; images/s, and whether the tokens
are identical (required in fp32; with bf16 autocast rounding may legitimately change a token,
so the number of identical captions is reported instead).

train: optimizer steps on synthetic tensors already on the device (data loading is not
measured): AdamW, ``CoCaLoss(caption 2.0, contrastive 1.0)``, autocast on CUDA, captions of
COCO-like lengths (8 to 18 tokens of 76). Each side trains as its training script does:
open_clip's model, loss and ``torch.optim.AdamW``; ours with ``caption_tokens_only`` and
``coca_cli.train.optim.make_optimizer`` (fused AdamW). Both start from the same weights and see the
same batches, so their loss curves are compared too (max relative difference).

loader: ``coca train``'s webdataset loader on real JPEGs (COCO-sized crops of scikit-image's
photos) with the training augmentation: decoded samples/s in all and per worker. ``coca
train`` logs ``data_wait``, the share of time the loop waited for batches, to show it keeps up.

Both models get identical weights (open_clip's is re-randomised with a seeded normal, then
copied into ours with ``load_state_dict(strict=True)``). Needs open_clip and transformers
(``pip install '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402

from coca_cli.model.config import get_model_config  # noqa: E402
from coca_cli.train.loss import CoCaLoss  # noqa: E402
from coca_cli.model.coca import CoCa  # noqa: E402
from coca_cli.train.config import TrainConfig  # noqa: E402
from coca_cli.train.optim import make_optimizer, param_groups  # noqa: E402

SOT, EOS = 49406, 49407
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}  # max relative difference of the curves


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights with non-degenerate logits (open_clip leaves some uninitialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name == "text_decoder.text_projection":
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif any(k in name for k in ("positional", "cls", "class", "token_embedding")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(p.shape[-1] ** -0.5 * torch.randn(p.shape, generator=g))
        if hasattr(model, "logit_scale"):
            model.logit_scale.fill_(2.659)  # ln(1 / 0.07), as trained models start


def build(name: str, seed: int = 0):
    if name not in open_clip.list_models():
        open_clip.add_model_config(str(ROOT / "models" / f"{name}.json"))
    torch.manual_seed(seed)
    ref = open_clip.create_model(name)
    randomize_(ref, seed + 1)
    ours = CoCa.from_config(get_model_config(name))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def image_size(model: CoCa) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device, fn):
    """fn's result and the peak GPU memory it allocated (GiB; None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    return out, torch.cuda.max_memory_allocated() / 2**30


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()


# -- generate ----------------------------------------------------------------------------------

def _caption(row: torch.Tensor) -> list[int]:
    """Token ids up to and including the first eos (the rest is padding)."""
    tokens = row.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def timed(fn, device: torch.device, repeats: int):
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def bench_generate(model_name: str, device: torch.device, batch: int, seq_len: int, dtype: str, repeats: int,
                   ref_repeats: int, seed: int = 0) -> dict:
    ref, ours = build(model_name, seed)
    ref, ours = ref.to(device).eval(), ours.to(device).eval()
    size = image_size(ours)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 2)).to(device)

    def ours_fn():
        with autocast(device, dtype):
            return ours.generate(images, seq_len=seq_len)

    def ref_fn():
        with autocast(device, dtype), torch.no_grad():
            return ref.generate(images, seq_len=seq_len)

    (ours_out, ours_s), ours_mem = peak_memory(device, lambda: timed(ours_fn, device, repeats))
    (ref_out, ref_s), ref_mem = peak_memory(device, lambda: timed(ref_fn, device, ref_repeats))
    same_rows = sum(_caption(a) == _caption(b) for a, b in zip(ours_out.cpu(), ref_out.cpu()))
    identical = ours_out.shape == ref_out.shape and torch.equal(ours_out.cpu(), ref_out.cpu())
    return {
        "task": "generate", "model": model_name, "device": str(device), "batch": batch, "seq_len": seq_len,
        "dtype": dtype, "threads": torch.get_num_threads(), "ours_s": ours_s, "open_clip_s": ref_s,
        "ours_per_s": batch / ours_s, "open_clip_per_s": batch / ref_s, "speedup": ref_s / ours_s,
        "ours_peak_gib": ours_mem, "open_clip_peak_gib": ref_mem,
        "identical": identical, "identical_rows": same_rows,
        "ok": identical or dtype != "float32",
        "check": "tokens identical" if identical else f"{same_rows}/{batch} captions identical",
    }


# -- train -------------------------------------------------------------------------------------

def synthetic_batches(steps: int, batch: int, size: int, context: int, seed: int) -> list[tuple]:
    """Images and COCO-like captions: sot, 8 to 18 random tokens, eos, then padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, generator=g)
        texts = torch.zeros(batch, context, dtype=torch.long)
        lengths = torch.randint(8, 19, (batch,), generator=g)
        for row, n in enumerate(lengths.tolist()):
            texts[row, 0], texts[row, n + 1] = SOT, EOS
            texts[row, 1:n + 1] = torch.randint(1, SOT, (n,), generator=g)
        out.append((images, texts))
    return out


def train_steps(model, optimizer, loss_fn, batches, device, dtype, warmup: int, **forward) -> tuple[float, list]:
    """Seconds per timed step (after ``warmup`` steps) and the total loss of every step."""
    losses, start = [], None
    for i, (images, texts) in enumerate(batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = model(images, texts, **forward)
            parts = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                            out["logit_scale"], output_dict=True)
            total = parts["contrastive_loss"] + parts["caption_loss"]
        total.backward()
        optimizer.step()
        losses.append(total.detach())
    synchronize(device)
    return (time.perf_counter() - start) / (len(batches) - warmup), [float(x) for x in losses]


def bench_train(model_name: str, device: torch.device, batch: int, dtype: str, warmup: int, steps: int,
                seed: int = 0) -> dict:
    ref, ours = build(model_name, seed)
    ref, ours = ref.to(device).train(), ours.to(device).train()
    cfg = TrainConfig(data="", lr=1e-5, wd=0.2)  # a small lr keeps random-weight losses finite
    ref_optimizer = torch.optim.AdamW(param_groups(ref, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    ours_optimizer = make_optimizer(ours, cfg)
    ref_loss = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    ours_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=ours.pad_id)
    batches = [(i.to(device), t.to(device)) for i, t in
               synthetic_batches(warmup + steps, batch, image_size(ours), ours.text.context_length, seed + 3)]

    (ours_s, ours_losses), ours_mem = peak_memory(device, lambda: train_steps(
        ours, ours_optimizer, ours_loss, batches, device, dtype, warmup, caption_tokens_only=True))
    ours = ours_optimizer = None  # free its memory before open_clip's peak is measured
    (ref_s, ref_losses), ref_mem = peak_memory(device, lambda: train_steps(
        ref, ref_optimizer, ref_loss, batches, device, dtype, warmup))
    gap = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(ours_losses, ref_losses))
    return {
        "task": "train", "model": model_name, "device": str(device), "batch": batch, "dtype": dtype,
        "threads": torch.get_num_threads(), "warmup": warmup, "steps": steps, "ours_s": ours_s, "open_clip_s": ref_s,
        "ours_per_s": batch / ours_s, "open_clip_per_s": batch / ref_s, "speedup": ref_s / ours_s,
        "ours_peak_gib": ours_mem, "open_clip_peak_gib": ref_mem,
        "ours_losses": ours_losses, "open_clip_losses": ref_losses, "loss_max_rel_diff": gap,
        "ok": gap <= LOSS_TOLERANCE[dtype], "check": f"loss curves within {gap:.1e}",
    }


# -- loader ------------------------------------------------------------------------------------

def photo_shards(folder: Path, samples: int, per_shard: int = 64, seed: int = 0) -> str:
    """Webdataset shards of real JPEG photos, as a training loader decodes them: scikit-image's
    sample photos cropped and resized to COCO-like sizes (480-640 x 360-480), quality 90."""
    import io
    import random

    import webdataset as wds
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")]
    rng = random.Random(seed)
    shards = (samples + per_shard - 1) // per_shard
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"photos-{shard:04d}.tar")) as sink:
            for i in range(per_shard):
                photo = rng.choice(photos)
                left, top = rng.randint(0, photo.width // 4), rng.randint(0, photo.height // 4)
                crop = photo.crop((left, top, photo.width - rng.randint(0, photo.width // 4),
                                   photo.height - rng.randint(0, photo.height // 4)))
                buf = io.BytesIO()
                crop.resize((rng.randint(480, 640), rng.randint(360, 480))).save(buf, "JPEG", quality=90)
                sink.write({"__key__": f"{shard:04d}-{i:04d}", "jpg": buf.getvalue(), "txt": "a photo"})
    return str(folder / f"photos-{{0000..{shards - 1:04d}}}.tar")


def bench_loader(workers: int, batch: int, samples: int, size: int = 224) -> dict:
    """Decoded, augmented samples/s of ``coca train``'s shard loader (TrainData) with ``workers``."""
    import tempfile
    from functools import partial

    from coca_cli.data.datasets import DataConfig, TrainData
    from coca_cli.data.tokenizer import tokenize
    from coca_cli.data.transforms import image_transform

    with tempfile.TemporaryDirectory() as tmp:
        spec = photo_shards(Path(tmp), samples)
        cfg = DataConfig(spec, workers=workers, batch_size=batch, num_samples=samples, shuffle_buffer=batch)
        data = TrainData(cfg, image_transform(size, is_train=True), partial(tokenize, context_length=77))
        batches = data.epoch(0)
        next(batches)  # warm-up: workers started and filling
        start, count = time.perf_counter(), 0
        for b in batches:
            count += len(b.images)
        seconds = time.perf_counter() - start
        batches.close()
    rate = count / seconds
    return {"task": "loader", "model": "-", "device": "cpu", "batch": batch, "dtype": "-", "workers": workers,
            "samples": count, "ours_per_s": rate, "per_worker_per_s": rate / max(workers, 1), "ok": True,
            "check": f"{workers} workers: {rate / max(workers, 1):.0f} samples/s each"}


# -- main --------------------------------------------------------------------------------------

def default_cases(device: torch.device, tasks: list[str]) -> list[tuple[str, str, int]]:
    """(task, model, batch) as issue 3 and issue 6 state them."""
    if device.type == "cuda":
        cases = [("generate", "coca_ViT-B-32", 32), ("generate", "coca_ViT-L-14", 8),
                 ("train", "coca_ViT-B-32", 256), ("train", "coca_ViT-L-14", 128)]
    else:
        cases = [("generate", "coca_ViT-B-32", 2), ("train", "coca_ViT-B-32", 8)]
    return [c for c in cases if c[0] in tasks]


def _memory(r: dict) -> str:
    if r["ours_peak_gib"] is None:
        return "-"
    return f"{r['ours_peak_gib']:.1f}/{r['open_clip_peak_gib']:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="generate,train,loader",
                        help="generate, train, loader, comma separated (default: all three)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--model", default=None, help="one model for every task (default: the standard cases)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the standard cases')")
    parser.add_argument("--seq-len", type=int, default=None, help="generate: seq_len (default: 20 on CPU, 30 on CUDA)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="generate: timed runs of ours (median)")
    parser.add_argument("--ref-repeats", type=int, default=None, help="generate: timed runs of open_clip")
    parser.add_argument("--warmup", type=int, default=None, help="train: untimed steps (default: 5 CUDA, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="train: timed steps (default: 20 CUDA, 5 CPU)")
    parser.add_argument("--loader-workers", default=None,
                        help="loader: worker counts to try, comma separated (default: 1 and all CPUs up to 8)")
    parser.add_argument("--loader-samples", type=int, default=512, help="loader: JPEGs decoded per worker count")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None, help="append one JSON line of results to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not tasks or set(tasks) - {"generate", "train", "loader"}:
        parser.error("--task takes generate, train and/or loader")
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    seq_len = args.seq_len or (30 if cuda else 20)
    warmup, steps = args.warmup or (5 if cuda else 2), args.steps or (20 if cuda else 5)
    cases = default_cases(device, tasks)
    if args.model:
        cases = [(task, args.model, batch) for task, _, batch in cases]
    if args.batch:
        cases = [(task, name, args.batch) for task, name, _ in cases]

    header = (f"{'task':<9}{'model':<15}{'device':<7}{'batch':>6}  {'dtype':<9}{'ours/s':>9}{'open_clip/s':>12}"
              f"{'ratio':>8}  {'peak GiB ours/oc':<17}check")
    print(header)
    print("-" * len(header))
    results = []
    if "loader" in tasks:
        default_workers = sorted({1, min(8, os.cpu_count() or 1)})
        counts = [int(w) for w in args.loader_workers.split(",")] if args.loader_workers else default_workers
        cases += [("loader", w, args.batch or 64) for w in counts]
    for task, name, batch in cases:
        if task == "loader":
            r = bench_loader(name, batch, args.loader_samples)
            results.append(r)
            print(f"{task:<9}{'-':<15}{'cpu':<7}{batch:>6}  {'-':<9}{r['ours_per_s']:>9.1f}{'-':>12}{'-':>8}  "
                  f"{'-':<17}{r['check']}", flush=True)
            continue
        if task == "generate":
            r = bench_generate(name, device, batch, seq_len, dtype, args.repeats, args.ref_repeats or args.repeats)
        else:
            r = bench_train(name, device, batch, dtype, warmup, steps)
        results.append(r)
        print(f"{task:<9}{name:<15}{device.type:<7}{batch:>6}  {dtype:<9}{r['ours_per_s']:>9.2f}"
              f"{r['open_clip_per_s']:>12.3f}{r['speedup']:>7.1f}x  {_memory(r):<17}{r['check']}", flush=True)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"results": results, "torch": torch.__version__,
                                "device_name": torch.cuda.get_device_name() if cuda else "cpu"}) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
