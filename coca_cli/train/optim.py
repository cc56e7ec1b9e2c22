"""What the optimizer updates and how fast: parameter groups, AdamW, the schedule, locked towers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import CocaError
from .config import TrainConfig


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, the logit scale/bias and embeddings are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim < 2 or leaf == "bias" or "ln_" in name or "norm" in name or leaf in ("logit_scale", "logit_bias")
            or "embedding" in name or leaf == "cls_emb")


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if no_weight_decay(name, param) else decay).append(param)
    return [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where this torch supports it for the device and dtype (several times faster)."""
    groups = param_groups(model, cfg.wd)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def freeze_unreached(model: nn.Module, loss: torch.Tensor) -> None:
    """Freeze the trainable parameters that ``loss`` (the training objective, on any batch) does
    not reach: those only a zero-weighted loss would train (with
    ``--coca-contrastive-loss-weight 0`` the logit scale and the projections to the shared
    embedding). They never get a gradient, so AdamW skips them (an optimizer may keep holding
    them); frozen, DDP expects no gradient for them and needs no search for unused parameters
    every step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param, grad in zip(trainable, torch.autograd.grad(loss, trainable, allow_unused=True)):
        if grad is None:
            param.requires_grad_(False)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup over ``warmup`` steps, then a cosine to zero at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = total - warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr if span > 0 else base_lr


def fitting_warmup(warmup: int, total_steps: int) -> int:
    """``warmup`` if the run is longer, else 10% of the steps: a warmup as long as the run would
    keep the learning rate far below its peak throughout (a fine-tune of 8 steps, warmup 1000)."""
    return warmup if warmup < total_steps else max(1, round(total_steps / 10))


def lock_image_tower(visual: nn.Module, unlocked_groups: int = 0) -> None:
    """Freeze the image tower (LiT), leaving the last ``unlocked_groups`` groups trainable:
    stem, each block, last block + pooling head, projection."""
    for p in visual.parameters():
        p.requires_grad = False
    if not unlocked_groups:
        return
    head = [m for m in (getattr(visual, "attn_pool", None), getattr(visual, "ln_post", None)) if m is not None]
    groups = [[visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
              *[[b] for b in visual.transformer.resblocks[:-1]],
              [visual.transformer.resblocks[-1], *head], [visual.proj]]
    _unlock(groups[-unlocked_groups:])


def lock_text_tower(text: nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze the unimodal text tower, leaving the last ``unlocked_layers`` groups trainable:
    embeddings, each block, last block + final norm, projection (open_clip's groups)."""
    for p in text.parameters():
        p.requires_grad = False
    if not unlocked_layers:
        return
    if not hasattr(text, "transformer") or not hasattr(text.transformer, "resblocks"):
        raise CocaError("--lock-text-unlocked-layers needs the built-in text tower")
    blocks = list(text.transformer.resblocks)
    groups = [[text.token_embedding, text.positional_embedding, text.cls_emb],
              *[[b] for b in blocks[:-1]], [blocks[-1], text.ln_final], [text.text_projection]]
    _unlock(groups[-unlocked_layers:])


def _unlock(groups) -> None:
    for group in groups:
        for item in group:
            if isinstance(item, nn.Parameter):
                item.requires_grad = True
            elif isinstance(item, nn.Module):
                for p in item.parameters():
                    p.requires_grad = True
