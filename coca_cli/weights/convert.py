"""``coca convert``: open_clip checkpoints to native safetensors folders, and back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from .checkpoint import load_weights, save_native, save_openclip
from ..errors import CocaError
from .factory import preprocess_config, resolve_config
from ..model.coca import CoCa

TARGETS = ("native", "openclip")


def nonfinite_tensor(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor holding NaN or inf, None when all are finite.

    Damaged weights are refused wherever they would be passed on: exported here, saved by
    training, or turned into scores (NaN is not a number anyone can use, nor valid JSON).
    """
    return next((name for name, tensor in tensors.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def convert(source: str | os.PathLike, output: str | os.PathLike, model_name: Optional[str] = None,
            to: str = "native", cache_dir: Optional[str] = None) -> Path:
    """Check ``source`` fits the config exactly, then write it in the ``to`` layout.

    native: ``OUTPUT/model.safetensors`` + ``OUTPUT/config.json``.
    openclip: ``OUTPUT/open_clip_pytorch_model.bin`` + ``OUTPUT/open_clip_config.json``.
    """
    if to not in TARGETS:
        raise CocaError(f"unknown conversion target '{to}' (choose native or openclip)")
    cfg, weights = resolve_config(model_name, str(source), cache_dir)
    model = CoCa.from_config(cfg)
    load_weights(model, weights)
    damaged = nonfinite_tensor(model.state_dict())
    if damaged:
        raise CocaError(f"{source}: tensor {damaged} holds NaN or inf values; refusing to export damaged weights",
                        exit_code=1)
    if to == "native":
        return save_native(model, cfg, output)
    preprocess = dataclasses.asdict(preprocess_config(model))
    return save_openclip(model, cfg, output, preprocess)
