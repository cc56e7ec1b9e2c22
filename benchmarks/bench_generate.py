"""Time ``generate`` of coca_cli against open_clip's, on the same random weights, in one run.

    python benchmarks/bench_generate.py                      # CPU: coca_ViT-B-32, 2 images, seq_len 20
    python benchmarks/bench_generate.py --device cuda         # + bf16 autocast, B-32 batch 32 and L-14 batch 8
    python benchmarks/bench_generate.py --model coca_ViT-B-32 --batch 4 --seq-len 30 --repeats 5 --json-out r.jsonl

Both models get identical weights (open_clip's model is re-randomised with a seeded normal,
then copied into ours with ``load_state_dict(strict=True)``); each case runs once to warm
up, then ``--repeats`` times, and reports the median. The tokens of both are compared; with
bf16 autocast tiny rounding differences can legitimately change a token, so there the number
of identical captions is reported rather than required.

open_clip and transformers are needed (``pip install -e .[test]``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402

from coca_cli.config import get_model_config  # noqa: E402
from coca_cli.model import CoCa  # noqa: E402

EOS = 49407


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


def build(name: str, seed: int = 0):
    if name not in open_clip.list_models():
        open_clip.add_model_config(str(ROOT / "models" / f"{name}.json"))
    torch.manual_seed(seed)
    ref = open_clip.create_model(name)
    randomize_(ref, seed + 1)
    ours = CoCa.from_config(get_model_config(name))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _caption(row: torch.Tensor) -> list[int]:
    """Token ids up to and including the first eos (the rest is padding)."""
    tokens = row.tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def timed(fn, device: torch.device, repeats: int):
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def run_case(model_name: str, device: torch.device, batch: int, seq_len: int, dtype: str, repeats: int,
             ref_repeats: int, seed: int = 0) -> dict:
    ref, ours = build(model_name, seed)
    ref.to(device)
    ours.to(device)
    size = ours.visual.image_size if hasattr(ours.visual, "image_size") else 224
    size = size[0] if isinstance(size, (tuple, list)) else size
    g = torch.Generator().manual_seed(seed + 2)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    amp = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext())

    def ours_fn():
        with amp:
            return ours.generate(images, seq_len=seq_len)

    def ref_fn():
        with amp, torch.no_grad():
            return ref.generate(images, seq_len=seq_len)

    ours_out, ours_s = timed(ours_fn, device, repeats)
    ref_out, ref_s = timed(ref_fn, device, ref_repeats)
    same_rows = sum(_caption(a) == _caption(b) for a, b in zip(ours_out.cpu(), ref_out.cpu()))
    identical = ours_out.shape == ref_out.shape and torch.equal(ours_out.cpu(), ref_out.cpu())
    return {
        "model": model_name, "device": str(device), "batch": batch, "seq_len": seq_len, "dtype": dtype,
        "threads": torch.get_num_threads(), "ours_s": ours_s, "open_clip_s": ref_s,
        "ours_img_s": batch / ours_s, "open_clip_img_s": batch / ref_s, "speedup": ref_s / ours_s,
        "identical": identical, "identical_rows": same_rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--model", default=None, help="one model (default: the standard cases)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="autocast dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median)")
    parser.add_argument("--ref-repeats", type=int, default=None, help="timed runs of open_clip (default: --repeats)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None, help="append one JSON line of results to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.model:
        cases = [(args.model, args.batch or 2, args.seq_len or 20)]
    elif device.type == "cuda":
        cases = [("coca_ViT-B-32", args.batch or 32, args.seq_len or 30), ("coca_ViT-L-14", args.batch or 8, args.seq_len or 30)]
    else:
        cases = [("coca_ViT-B-32", args.batch or 2, args.seq_len or 20)]

    results = []
    header = f"{'model':<16}{'device':<8}{'batch':>6}{'seq':>5}  {'dtype':<9}{'ours img/s':>11}{'open_clip img/s':>16}{'ratio':>8}  tokens"
    print(header)
    print("-" * len(header))
    for name, batch, seq_len in cases:
        r = run_case(name, device, batch, seq_len, dtype, args.repeats, args.ref_repeats or args.repeats)
        results.append(r)
        tokens = "identical" if r["identical"] else f"{r['identical_rows']}/{batch} rows identical"
        print(f"{name:<16}{device.type:<8}{batch:>6}{seq_len:>5}  {dtype:<9}{r['ours_img_s']:>11.2f}"
              f"{r['open_clip_img_s']:>16.3f}{r['speedup']:>7.1f}x  {tokens}", flush=True)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"results": results, "torch": torch.__version__}) + "\n")
    exact_required = [r for r in results if r["dtype"] == "float32"]
    return 0 if all(r["identical"] for r in exact_required) else 1


if __name__ == "__main__":
    sys.exit(main())
