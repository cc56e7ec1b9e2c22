"""coca_cli against open_clip 3.3.0, side by side in one run on the same random weights.

    python benchmarks/bench.py                        # CPU: generate (B-32, 2 images), train (B-32, batch 8), loader
    python benchmarks/bench.py --device cuda          # issue 6's H100 cases, bf16 autocast
    python benchmarks/bench.py --task train --model coca_ViT-L-14 --batch 128 --device cuda --json-out r.jsonl
    python benchmarks/bench.py --task flops,loader    # issue 14's four figures (B-32 and L-14), exact on a CPU

generate: ``model.generate`` with the beam search defaults; images/s, and whether the tokens
are identical (required in fp32; with bf16 autocast rounding may legitimately change a token,
so the number of identical captions is reported instead).

train: optimizer steps on synthetic tensors already on the device (data loading is not
measured): AdamW, ``CoCaLoss(caption 2.0, contrastive 1.0)``, autocast on CUDA, captions of
COCO-like lengths (8 to 18 tokens of 76). Each side trains as its training script does:
open_clip's model, loss and ``torch.optim.AdamW``; ours with ``caption_tokens_only`` and
``coca_cli.train.optim.make_optimizer`` (fused AdamW). Both start from the same weights and see the
same batches, so their loss curves are compared too (max relative difference).

flops: issue 14's exact figures, for one training step (batch 8, forward, ``CoCaLoss(2, 1)``,
backward) and one beam search (6 beams / 3 groups, batch 4), each side run as its training
script or ``generate`` runs it: FLOPs per sample (``FlopCounterMode``), bytes saved for backward
per sample (``saved_tensors_hooks``), aten ops and host synchronisations per generated token (a
``TorchDispatchMode``; on a GPU each op is about one kernel launch), next to the targets.
Independent of the machine's load, so they can be compared across runs.

loader: ``coca train``'s webdataset loader on real JPEGs (COCO-sized crops of scikit-image's
photos) with the training augmentation: decoded samples/s in all and per worker. ``coca
train`` logs ``data_wait``, the share of time the loop waited for batches, to show it keeps up.
Each JPEG decode path (``DECODE_PATHS``) runs on the same shards, the first one the baseline;
the others also with their uint8 batches left for the training device to normalise, as on a GPU.
``--loader-baseline DIR`` also runs the loader of another checkout (the package when an issue
was filed: ``git worktree add DIR 85d07a5`` for issue 14's "today"). Every loader run is a
fresh process of its own (``loader_rate.py``), so none inherits what ran before it.

Both models get identical weights (open_clip's is re-randomised with a seeded normal, then
copied into ours with ``load_state_dict(strict=True)``). Needs open_clip and transformers
(``pip install '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import open_clip  # noqa: E402

from coca_cli.model import packed  # noqa: E402
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

def synthetic_batches(steps: int, batch: int, size: int, context: int, seed: int,
                      words: tuple[int, int] = (8, 18)) -> list[tuple]:
    """Images and COCO-like captions: sot, ``words`` (lowest, highest) random tokens, eos, then padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        images = torch.randn(batch, 3, size, size, generator=g)
        texts = torch.zeros(batch, context, dtype=torch.long)
        lengths = torch.randint(words[0], words[1] + 1, (batch,), generator=g)
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


# -- flops: work per sample and per token, counted exactly (issue 14) ---------------------------

TARGETS = {"flops": 0.52, "saved": 0.50, "ops_per_token": 500}  # issue 14: ours/open_clip, ours/open_clip, ops
# Ops that make the host wait for the device (their result decides what runs next). On CPU,
# ``.tolist()``/``.numpy()`` read memory without dispatching an op, so they are not seen here.
SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
            "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave"}


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention dispatches to here (both models use it): without these the
# attention products of both towers would count as free.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops}


class SavedBytes:
    """Bytes autograd keeps for backward during a forward, counted two ways.

    ``bytes`` (activations): each underlying storage counts once, whole, parameters left out.
    Many saved tensors are views of one buffer (a transposed weight, q/k/v sliced from one
    projection, the same activation saved by two ops), and what stays in memory is the buffer,
    however many views of it are saved. Parameters are in memory anyway, whether or not backward
    needs them (both models hold the same ones). Storages are told apart by ``data_ptr``, which is
    safe here: a saved storage stays alive until backward, so no other storage can reuse its
    address while we count.

    ``tensor_bytes`` is how issue 14's table counts (it reproduces the issue's 296 MB for
    open_clip): every distinct saved tensor at its own size, parameters included, so two views of
    one buffer count twice.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.seen_tensors: set[tuple] = set()
        self.bytes = 0
        self.param_bytes = 0  # the parameters' storages among the saved tensors, each once
        self.tensor_bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            if ptr in self.params:
                self.param_bytes += storage.nbytes()
            else:
                self.bytes += storage.nbytes()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if view not in self.seen_tensors:
            self.seen_tensors.add(view)
            self.tensor_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


class OpCounter(TorchDispatchMode):
    """Every aten op dispatched (on a GPU each is about one kernel launch), and the host syncs among them."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += func.is_view  # metadata only (view, transpose, select, ...): no kernel on a GPU
        self.syncs += str(func.overloadpacket) in SYNC_OPS
        return func(*args, **(kwargs or {}))


def counted_step(model, loss_fn, images, texts, forward: dict, loss_kw: dict) -> tuple[int, SavedBytes, float]:
    """FLOPs and saved-for-backward bytes of one training step (forward, loss, backward), and its loss."""
    model.zero_grad(set_to_none=True)
    saved = SavedBytes(model)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as flops:
        with saved.hooks():
            out = model(images, texts, **forward)
            parts = loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                            out["logit_scale"], output_dict=True, **loss_kw)
            total = parts["contrastive_loss"] + parts["caption_loss"]
        total.backward()
    model.zero_grad(set_to_none=True)
    return flops.get_total_flops(), saved, float(total.detach())


def counted_generate(generate) -> tuple[torch.Tensor, OpCounter]:
    """The tokens ``generate()`` returns and the count of the aten ops it dispatched."""
    with torch.no_grad(), OpCounter() as counter:
        tokens = generate()
    return tokens, counter


def bench_flops(model_name: str, device: torch.device, batch: int, gen_batch: int, seq_len: int, seed: int = 0) -> dict:
    """Issue 14's exact figures, ours next to open_clip on the same weights and inputs.

    Training: one step on ``batch`` captions of 10 to 16 tokens (sot and eos included) padded
    to the context, each side run as its training script runs it: open_clip as open_clip_train
    does (``model(images, texts)``, ``CoCaLoss(2, 1)``), ours as ``coca train`` does
    (``caption_tokens_only=True``, the loss divided by the batch's caption tokens).
    Generation: beam search (6 beams, 3 groups: the defaults) on ``gen_batch`` images; ops per
    generated token are the ops of the whole call divided by its decoding steps (the tokens
    after the start token of the longest returned caption; both sides return the same tokens).
    """
    start = time.perf_counter()
    ref, ours = build(model_name, seed)
    ref, ours = ref.to(device).train(), ours.to(device).train()
    (images, texts), = synthetic_batches(1, batch, image_size(ours), ours.text.context_length, seed + 3, words=(8, 14))
    images, texts = images.to(device), texts.to(device)
    caption_tokens = float((texts[:, 1:] != ours.pad_id).sum())
    ours_loss = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=ours.pad_id)
    ref_loss = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    ours_flops, ours_saved, ours_total = counted_step(ours, ours_loss, images, texts, {"caption_tokens_only": True},
                                                      {"caption_tokens": caption_tokens})
    ref_flops, ref_saved, ref_total = counted_step(ref, ref_loss, images, texts, {}, {})

    ref, ours = ref.eval(), ours.eval()
    gen_images = images[:gen_batch]
    ours.generate(gen_images, seq_len=seq_len)  # warm-up: one-time work (CPU weight packing) is not per token
    ours_tokens, ours_count = counted_generate(lambda: ours.generate(gen_images, seq_len=seq_len))
    ref_tokens, ref_count = counted_generate(lambda: ref.generate(gen_images, seq_len=seq_len))
    with mock.patch.object(packed, "available", lambda: False):  # no oneDNN post-ops: a GPU's eager path
        unfused_tokens, unfused_count = counted_generate(lambda: ours.generate(gen_images, seq_len=seq_len))
    ours_ops, ref_ops = ours_count.ops, ref_count.ops
    steps = max(ref_tokens.shape[1] - 1, 1)
    identical = all(t.shape == ref_tokens.shape and torch.equal(t.cpu(), ref_tokens.cpu())
                    for t in (ours_tokens, unfused_tokens))
    loss_gap = abs(ours_total - ref_total) / max(abs(ref_total), 1e-8)

    flops_ratio, saved_ratio = ours_flops / ref_flops, ours_saved.bytes / ref_saved.bytes
    ours_with_params, ref_with_params = (s.bytes + s.param_bytes for s in (ours_saved, ref_saved))
    ours_per_token = ours_ops / steps
    return {
        "task": "flops", "model": model_name, "device": str(device), "batch": batch, "gen_batch": gen_batch,
        "seq_len": seq_len, "decode_steps": steps, "threads": torch.get_num_threads(),
        "ours_flops_per_sample": ours_flops / batch, "open_clip_flops_per_sample": ref_flops / batch,
        "flops_ratio": flops_ratio, "flops_target": TARGETS["flops"], "flops_met": flops_ratio <= TARGETS["flops"],
        "ours_saved_bytes_per_sample": ours_saved.bytes / batch,
        "open_clip_saved_bytes_per_sample": ref_saved.bytes / batch,
        "ours_saved_with_params_per_sample": ours_with_params / batch,
        "open_clip_saved_with_params_per_sample": ref_with_params / batch,
        "saved_with_params_ratio": ours_with_params / ref_with_params,
        "ours_saved_tensors_per_sample": ours_saved.tensor_bytes / batch,
        "open_clip_saved_tensors_per_sample": ref_saved.tensor_bytes / batch,
        "saved_tensors_ratio": ours_saved.tensor_bytes / ref_saved.tensor_bytes,
        "saved_ratio": saved_ratio, "saved_target": TARGETS["saved"], "saved_met": saved_ratio <= TARGETS["saved"],
        "ours_ops_per_token": ours_per_token, "open_clip_ops_per_token": ref_ops / steps,
        "ops_ratio": ours_ops / ref_ops, "ops_target": TARGETS["ops_per_token"],
        "ops_met": ours_per_token <= TARGETS["ops_per_token"],
        "ours_kernel_ops_per_token": (ours_ops - ours_count.views) / steps,
        "ours_unfused_ops_per_token": unfused_count.ops / steps,
        "ours_unfused_kernel_ops_per_token": (unfused_count.ops - unfused_count.views) / steps,
        "open_clip_kernel_ops_per_token": (ref_ops - ref_count.views) / steps,
        "ours_syncs_per_token": ours_count.syncs / steps, "open_clip_syncs_per_token": ref_count.syncs / steps,
        "loss_rel_diff": loss_gap, "identical": identical, "seconds": time.perf_counter() - start,
        "ok": identical and loss_gap <= LOSS_TOLERANCE["float32"],
        "check": f"loss within {loss_gap:.1e}, tokens {'identical' if identical else 'DIFFER'}",
    }


def print_flops(r: dict) -> None:
    """The issue's table for one model: open_clip, ours, ratio, target and whether it is met."""
    def met(flag):
        return "yes" if flag else "NO"

    rows = [
        ("training GFLOPs/sample", r["open_clip_flops_per_sample"] / 1e9, r["ours_flops_per_sample"] / 1e9,
         r["flops_ratio"], f"<= {r['flops_target']:.2f}x", met(r["flops_met"])),
        ("saved for backward MB/sample", r["open_clip_saved_bytes_per_sample"] / 1e6,
         r["ours_saved_bytes_per_sample"] / 1e6, r["saved_ratio"], f"<= {r['saved_target']:.2f}x",
         met(r["saved_met"])),
        ("  with the parameters it saves (batch)", r["open_clip_saved_with_params_per_sample"] / 1e6,
         r["ours_saved_with_params_per_sample"] / 1e6, r["saved_with_params_ratio"], "-", "-"),
        ("  per saved tensor, as the issue counts", r["open_clip_saved_tensors_per_sample"] / 1e6,
         r["ours_saved_tensors_per_sample"] / 1e6, r["saved_tensors_ratio"], f"<= {r['saved_target']:.2f}x",
         met(r["saved_tensors_ratio"] <= r["saved_target"])),
        (f"aten ops/token (beam 6/3, batch {r['gen_batch']})", r["open_clip_ops_per_token"],
         r["ours_ops_per_token"], r["ops_ratio"], f"<= {r['ops_target']} ops", met(r["ops_met"])),
        ("  of which not views (kernels)", r["open_clip_kernel_ops_per_token"], r["ours_kernel_ops_per_token"],
         r["ours_kernel_ops_per_token"] / r["open_clip_kernel_ops_per_token"], "-", "-"),
        ("  without oneDNN's fused GELU/add", r["open_clip_ops_per_token"], r["ours_unfused_ops_per_token"],
         r["ours_unfused_ops_per_token"] / r["open_clip_ops_per_token"], "-", "-"),
        ("    of which not views", r["open_clip_kernel_ops_per_token"], r["ours_unfused_kernel_ops_per_token"],
         r["ours_unfused_kernel_ops_per_token"] / r["open_clip_kernel_ops_per_token"], "-", "-"),
        ("host syncs/token", r["open_clip_syncs_per_token"], r["ours_syncs_per_token"], None, "-", "-"),
    ]
    print(f"flops    {r['model']}  {r['device']}, train batch {r['batch']}, {r['decode_steps']} decoding steps, "
          f"{r['seconds']:.0f} s; {r['check']}")
    print(f"         {'figure':<38}{'open_clip':>11}{'ours':>11}{'ratio':>8}  {'target':<14}met")
    for name, ref, ours, ratio, target, ok in rows:
        ratio = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"         {name:<38}{ref:>11.1f}{ours:>11.1f}{ratio:>8}  {target:<14}{ok}", flush=True)


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


LOADER_TARGET = 2.0  # issue 14: samples/s per core, the new decode path over the previous one


# The JPEG decode paths run side by side, baseline first (``loader_rate.py --decode``). previous: every
# JPEG decoded whole, then cropped, converted and normalised sample by sample (before issue 14);
# new: decoded at reduced size for the crop, batched as uint8 and normalised per batch.
DECODE_PATHS = ("previous", "new")


def bench_loader(spec: str, workers: int, batch: int, samples: int, on_device: bool = False,
                 package: Path = ROOT, decode: Optional[str] = None) -> dict:
    """Decoded, augmented samples/s of ``coca train``'s shard loader with ``workers`` (0: in the
    loader's process), measured in a fresh process (``loader_rate.py``): this checkout's with a
    ``decode`` path, or the loader of the checkout ``package``."""
    command = [sys.executable, str(Path(__file__).with_name("loader_rate.py")), "--package", str(package),
               spec, str(workers), str(batch), str(samples)]
    command += ["--decode", decode] if decode else []
    command += ["--on-device"] if on_device else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the loader of {package} failed:\n{out.stderr.strip()}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    count, rate = measured["samples"], measured["per_s"]
    return {"task": "loader", "model": "-", "device": "cpu", "batch": batch, "dtype": "-", "workers": workers,
            "samples": count, "ours_per_s": rate, "per_worker_per_s": rate / max(workers, 1), "ok": True}


def _loader_verdict(speedup: float) -> str:
    return f"target >= {LOADER_TARGET:.0f}x: {'met' if speedup >= LOADER_TARGET else 'NOT met'}"


def _median_run(results: list[dict]) -> dict:
    """The run of median rate (the lower one of an even count)."""
    return sorted(results, key=lambda run: run["per_worker_per_s"])[(len(results) - 1) // 2]


CHECKOUT = "checkout"  # bench_loaders' name for the loader of --loader-baseline's checkout


def bench_loaders(worker_counts: list[int], batch: int, samples: int, repeats: int = 1,
                  checkout: Optional[str] = None) -> list[dict]:
    """Every decode path with every worker count on the same shards; each row's ``speedup`` is its
    per-core rate over the baseline path's with as many workers (issue 14: >= 2x). Paths other
    than the baseline are also run ``on_device`` (``device_ready_speedup``); the baseline's
    samples are normalised floats already. With ``checkout`` (another checkout of the package:
    issue 14's "today" is 85d07a5) its loader runs too, first in each round, and the other paths'
    rows also give their rates over its (``checkout_speedup``, ``device_ready_checkout_speedup``).
    With ``repeats`` the runs alternate that many times and each figure is the run of median rate:
    a run of a few seconds moves by +-15% on a shared machine."""
    import tempfile

    rows, paths = [], DECODE_PATHS
    baseline = paths[0]
    runs_of = [(path, False) for path in paths] + [(path, True) for path in paths if path != baseline]
    if checkout:
        runs_of.insert(0, (CHECKOUT, False))
    with tempfile.TemporaryDirectory() as tmp:
        spec = photo_shards(Path(tmp), samples)
        for workers in worker_counts:
            runs = {run: [] for run in runs_of}
            for _ in range(repeats):
                for path, on_device in runs_of:
                    loader = {"package": checkout} if path == CHECKOUT else {"decode": path}
                    runs[path, on_device].append(bench_loader(spec, workers, batch, samples, on_device=on_device,
                                                              **loader))
            base_rate = _median_run(runs[baseline, False])["per_worker_per_s"]
            checkout_rate = _median_run(runs[CHECKOUT, False])["per_worker_per_s"] if checkout else None
            for path in ([CHECKOUT] if checkout else []) + list(paths):
                r = _median_run(runs[path, False])
                r["runs_per_worker_per_s"] = [run["per_worker_per_s"] for run in runs[path, False]]
                speedup = r["per_worker_per_s"] / base_rate
                r.update(decode=f"{CHECKOUT} {checkout}" if path == CHECKOUT else path, speedup=speedup,
                         target=LOADER_TARGET)
                r["check"] = f"{r['decode']} decode, {workers} workers: {r['per_worker_per_s']:.0f} samples/s per core"
                if repeats > 1:
                    r["check"] += f" (median of {repeats})"
                if path not in (baseline, CHECKOUT):
                    ready = _median_run(runs[path, True])
                    r["device_ready_per_s"] = ready["per_worker_per_s"]
                    r["runs_device_ready_per_worker_per_s"] = [run["per_worker_per_s"] for run in runs[path, True]]
                    r["device_ready_speedup"] = ready["per_worker_per_s"] / base_rate
                    r["check"] += (f", {speedup:.2f}x {baseline} ({_loader_verdict(speedup)}); normalised on the "
                                   f"training device instead: {r['device_ready_per_s']:.0f}/s per core, "
                                   f"{r['device_ready_speedup']:.2f}x ({_loader_verdict(r['device_ready_speedup'])})")
                    if checkout:
                        r["checkout_speedup"] = r["per_worker_per_s"] / checkout_rate
                        r["device_ready_checkout_speedup"] = r["device_ready_per_s"] / checkout_rate
                        r["check"] += (f"; over the {CHECKOUT}: {r['checkout_speedup']:.2f}x "
                                       f"({_loader_verdict(r['checkout_speedup'])}), normalised on the device "
                                       f"{r['device_ready_checkout_speedup']:.2f}x "
                                       f"({_loader_verdict(r['device_ready_checkout_speedup'])})")
                rows.append(r)
                print(f"{'loader':<9}{'-':<15}{'cpu':<7}{batch:>6}  {'-':<9}{r['ours_per_s']:>9.1f}{'-':>12}"
                      f"{speedup:>7.2f}x  {'-':<17}{r['check']}", flush=True)
    return rows


# -- retrieve ----------------------------------------------------------------------------------

RETRIEVE_CLUSTERS = 1000


def synthetic_embeddings(count: int, dim: int, seed: int, block: int = 65536) -> torch.Tensor:
    """Normalised embeddings around ``RETRIEVE_CLUSTERS`` fixed random centres (as much noise as centre),
    as image embeddings cluster by subject; uniform random ones have no neighbourhoods to find."""
    centres = torch.randn(RETRIEVE_CLUSTERS, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(count, dim)
    for start in range(0, count, block):  # in blocks: the collection is the peak memory
        rows = min(block, count - start)
        noisy = centres[torch.randint(RETRIEVE_CLUSTERS, (rows,), generator=g)] + torch.randn(rows, dim, generator=g)
        out[start:start + rows] = torch.nn.functional.normalize(noisy, dim=1)
    return out


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / sum(len(t) for t in truth)


def bench_retrieve(count: int, dim: int, queries: int, index_types: list[str], repeats: int,
                   ef_construction: int, k: int = 10) -> list[dict]:
    """``coca retrieve``'s search over ``count`` synthetic embeddings: the naive full matmul and topk
    (the reference: open_clip has no retrieval), the chunked exact search, and each faiss index
    (build time, and recall@k against exact search), each for ``queries`` queries at once and one."""
    from coca_cli.tasks import ann
    from coca_cli.tasks.retrieval import search

    collection, asked = synthetic_embeddings(count, dim, seed=1), synthetic_embeddings(queries, dim, seed=2)
    names = [str(i) for i in range(count)]

    def hits(q, approximate=None):
        return [[int(h.item) for h in r.hits] for r in search(["q"] * len(q), q, names, collection, k,
                                                             approximate=approximate)]

    def latencies(fn):
        found, batch_s = timed(lambda: fn(asked), torch.device("cpu"), repeats)
        return found, batch_s, timed(lambda: fn(asked[:1]), torch.device("cpu"), repeats)[1]

    naive, naive_s, naive_one = latencies(lambda q: (q @ collection.T).topk(k, dim=1).indices.tolist())
    exact, exact_s, exact_one = latencies(hits)
    agreement = _recall(exact, naive)
    base = {"task": "retrieve", "size": count, "dim": dim, "queries": queries, "k": k,
            "threads": torch.get_num_threads()}
    rows = [{**base, "method": "naive", "batch_s": naive_s, "single_s": naive_one, "ok": True},
            {**base, "method": "exact", "batch_s": exact_s, "single_s": exact_one, "recall_vs_naive": agreement,
             "ok": agreement >= 0.999}]  # a near tie within fp32 rounding may swap the 10th and 11th
    print(f"retrieve {count} x {dim}, {queries} queries, top {k}: naive matmul+topk {naive_s:.3f} s "
          f"(one query {naive_one * 1e3:.1f} ms); exact chunked {exact_s:.3f} s (one query {exact_one * 1e3:.1f} ms), "
          f"{agreement:.4f} of the naive hits", flush=True)
    for index_type in index_types:
        start = time.perf_counter()
        index = ann.build_index(index_type, collection, ef_construction=ef_construction)
        build_s = time.perf_counter() - start
        approximate = ann.ApproximateIndex(index, index_type)
        found, batch_s, one = latencies(lambda q: hits(q, approximate))
        recall = _recall(found, exact)
        del index, approximate
        rows.append({**base, "method": index_type, "build_s": build_s, "batch_s": batch_s, "single_s": one,
                     "recall_at_k": recall, "ok": True})
        print(f"  {index_type:<5} build {build_s:8.1f} s, {queries} queries {batch_s:.3f} s, one query "
              f"{one * 1e3:.2f} ms, recall@{k} {recall:.4f} against exact", flush=True)
    return rows


# -- main --------------------------------------------------------------------------------------

def default_cases(device: torch.device, tasks: list[str]) -> list[tuple[str, str, int]]:
    """(task, model, batch) as issue 3 and issue 6 state them."""
    if device.type == "cuda":
        cases = [("generate", "coca_ViT-B-32", 32), ("generate", "coca_ViT-L-14", 8),
                 ("train", "coca_ViT-B-32", 256), ("train", "coca_ViT-L-14", 128)]
    else:
        cases = [("generate", "coca_ViT-B-32", 2), ("train", "coca_ViT-B-32", 8)]
    cases += [("flops", "coca_ViT-B-32", 8), ("flops", "coca_ViT-L-14", 8)]  # issue 14: the same on every device
    return [c for c in cases if c[0] in tasks]


def _memory(r: dict) -> str:
    if r["ours_peak_gib"] is None:
        return "-"
    return f"{r['ours_peak_gib']:.1f}/{r['open_clip_peak_gib']:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="generate,train,loader", help="generate, train, loader, flops, "
                        "retrieve, comma separated (default: generate,train,loader)")
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
    parser.add_argument("--gen-batch", type=int, default=4, help="flops: images for the beam search count")
    parser.add_argument("--loader-workers", default=None,
                        help="loader: worker counts to try, comma separated (default: 1 and all CPUs up to 8)")
    parser.add_argument("--loader-samples", type=int, default=512, help="loader: JPEGs decoded per worker count")
    parser.add_argument("--loader-repeats", type=int, default=1, help="loader: runs of each path, alternating "
                        "(the median is reported)")
    parser.add_argument("--loader-baseline", default=None, metavar="DIR", help="loader: also run the loader of "
                        "this other checkout of the package, e.g. 'git worktree add /tmp/before 85d07a5' (issue 14's today)")
    parser.add_argument("--sizes", default="100000,1000000", help="retrieve: collection sizes, comma separated")
    parser.add_argument("--dim", type=int, default=768, help="retrieve: embedding width")
    parser.add_argument("--queries", type=int, default=100, help="retrieve: queries searched at once")
    parser.add_argument("--index-types", default="flat,ivf,hnsw", help="retrieve: faiss indexes to compare ('' none)")
    parser.add_argument("--ef-construction", type=int, default=None, help="retrieve: hnsw build effort "
                        "(default: coca's)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None, help="append one JSON line of results to this file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available")
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not tasks or set(tasks) - {"generate", "train", "loader", "flops", "retrieve"}:
        parser.error("--task takes generate, train, loader, flops and/or retrieve")
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    seq_len = args.seq_len or (30 if cuda else 20)
    warmup, steps = args.warmup or (5 if cuda else 2), args.steps or (20 if cuda else 5)
    cases = default_cases(device, tasks)
    if args.model:
        cases = [(task, args.model, batch) for task, _, batch in cases]
    if args.batch:
        cases = [(task, name, args.batch) for task, name, _ in cases]
    cases = list(dict.fromkeys(cases))  # --model makes the two flops cases one

    header = (f"{'task':<9}{'model':<15}{'device':<7}{'batch':>6}  {'dtype':<9}{'ours/s':>9}{'open_clip/s':>12}"
              f"{'ratio':>8}  {'peak GiB ours/oc':<17}check")
    if set(tasks) - {"flops", "retrieve"}:
        print(header)
        print("-" * len(header))
    results = []
    if "retrieve" in tasks:
        from coca_cli.tasks.ann import HNSW_EF_CONSTRUCTION

        index_types = [t for t in args.index_types.split(",") if t]
        for size in [int(n) for n in args.sizes.split(",")]:
            results += bench_retrieve(size, args.dim, args.queries, index_types, args.repeats,
                                      args.ef_construction or HNSW_EF_CONSTRUCTION)
    if "loader" in tasks:
        default_workers = sorted({0, 1, min(8, os.cpu_count() or 1)})  # 0: everything on one core
        counts = [int(w) for w in args.loader_workers.split(",")] if args.loader_workers else default_workers
        cases.append(("loader", tuple(counts), args.batch or 64))
    for task, name, batch in cases:
        if task == "loader":
            results += bench_loaders(list(name), batch, args.loader_samples, args.loader_repeats,
                                     args.loader_baseline)
            continue
        if task == "flops":
            r = bench_flops(name, device, batch, min(args.gen_batch, batch), seq_len)
            results.append(r)
            print_flops(r)
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
