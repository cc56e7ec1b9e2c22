"""``coca convert``: open_clip checkpoints to native safetensors folders, and back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

from .checkpoint import load_weights, save_native, save_openclip
from ..errors import CocaError
from .factory import preprocess_config, resolve_config
from ..model.coca import CoCa

TARGETS = ("native", "openclip")


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
    if to == "native":
        return save_native(model, cfg, output)
    preprocess = dataclasses.asdict(preprocess_config(model))
    return save_openclip(model, cfg, output, preprocess)
