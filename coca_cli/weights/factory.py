"""Building models, transforms and tokenizers by name, as open_clip's factory does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import find_weights, load_weights, stored_config
from ..model.config import CoCaConfig, get_model_config, parameter_counts
from ..errors import CocaError
from ..model.coca import CoCa
from .pretrained import resolve
from ..data.tokenizer import Tokenizer
from ..data.transforms import OPENAI_MEAN, OPENAI_STD, PreprocessCfg, image_transform

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_config(model_name: Optional[str], pretrained: Optional[str] = None,
                   cache_dir: Optional[str] = None) -> tuple[CoCaConfig, Optional[Path]]:
    """The model config and local weights path for a (model, pretrained) pair.

    With ``model_name=None`` the config stored with the weights is used (native export,
    ``hf-hub:`` repo, open_clip hub folder or ``coca train`` checkpoint).
    """
    cfg = get_model_config(model_name) if model_name is not None else None  # bad names fail before downloads
    weights = resolve(model_name, pretrained, cache_dir) if pretrained else None
    if cfg is None:
        cfg = stored_config(weights) if weights is not None else None
        if cfg is None:
            raise CocaError("no model given: pass --model NAME, or --pretrained a folder holding config.json "
                            "or a coca training checkpoint")
    check_size(cfg, weights)
    return cfg, weights


STORED_PARAMETER_BYTES = 2  # the fewest bytes a stored parameter takes (fp16, bf16)
BUILT_PARAMETER_BYTES = 4  # models are built in fp32, then cast
LAYER_OBJECT_BYTES = 32 * 1024  # the Python objects of one transformer block, measured
# Models up to this size are built without question: weights that do not fit one then get the
# exact keys and shapes that differ (check_fits), which says more than a size does.
SMALL_MODEL_BYTES = 2 * 2 ** 30


def check_size(cfg: CoCaConfig, weights: Optional[Path]) -> None:
    """Refuse, before anything is allocated, a config whose model cannot be the weights given with it
    (more parameters than the file could hold) or cannot fit in this machine's memory."""
    counts = parameter_counts(cfg)
    total = sum(counts.values())
    text_layers = 0 if cfg.text_cfg.hf_model_name else cfg.text_cfg.layers
    layers = cfg.vision_cfg.layers + text_layers + 2 * cfg.multimodal_cfg.layers  # the decoder's come in pairs
    needed = total * BUILT_PARAMETER_BYTES + layers * LAYER_OBJECT_BYTES
    if needed <= SMALL_MODEL_BYTES:
        return
    largest = max(counts, key=counts.get)
    section = getattr(cfg, largest)
    described = (f"model config {cfg.name} describes a model of {total:,} parameters, mostly in {largest} "
                 f"(layers {section.layers}, width {section.width})")
    weights_file = find_weights(weights) if weights is not None and weights.exists() else None
    if weights_file is not None:
        size = weights_file.stat().st_size
        if total * STORED_PARAMETER_BYTES > size:
            raise CocaError(f"{described}, more than {weights_file} can hold ({size:,} bytes): the file is "
                            "truncated, or the config is not the one these weights were saved with")
    memory = _physical_memory()
    if memory and needed > memory:
        raise CocaError(f"{described}, which needs about {needed / 2 ** 30:,.1f} GiB of memory; "
                        f"this machine has {memory / 2 ** 30:,.1f} GiB")


def _physical_memory() -> Optional[int]:
    """Bytes of RAM, or None where the system does not say (Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def create_model(
    model_name: Optional[str] = "coca_ViT-B-32",
    pretrained: Optional[str | os.PathLike] = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: Optional[str] = None,
    **overrides,
) -> CoCa:
    """A CoCa model in eval mode; ``pretrained`` is a tag, ``hf-hub:`` name or local path.

    ``overrides`` replace top-level config fields (e.g. ``init_logit_bias``).
    """
    if precision not in PRECISIONS:
        raise CocaError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    cfg, weights = resolve_config(model_name, str(pretrained) if pretrained else None, cache_dir)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise CocaError(f"unknown model option '{key}'")
        setattr(cfg, key, value)
    dtype = PRECISIONS[precision]
    model = CoCa.from_config(cfg, cast_dtype=dtype if dtype != torch.float32 else None)
    if weights is not None:
        load_weights(model, weights)
    return model.to(device=device, dtype=dtype).eval()


def preprocess_config(model: CoCa) -> PreprocessCfg:
    """CoCa weights expect OpenAI's mean/std, bicubic resize of the short side."""
    return PreprocessCfg(size=model.visual.image_size, mean=OPENAI_MEAN, std=OPENAI_STD,
                         interpolation="bicubic", resize_mode="shortest")


def create_model_and_transforms(
    model_name: Optional[str] = "coca_ViT-B-32",
    pretrained: Optional[str | os.PathLike] = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: Optional[str] = None,
    image_mean: Optional[tuple] = None,
    image_std: Optional[tuple] = None,
    aug_cfg: Optional[dict] = None,
    **overrides,
):
    """(model, train transform, eval transform), like ``open_clip.create_model_and_transforms``."""
    model = create_model(model_name, pretrained, precision, device, cache_dir, **overrides)
    pp = preprocess_config(model)
    mean, std = image_mean or pp.mean, image_std or pp.std
    train = image_transform(pp.size, is_train=True, mean=mean, std=std, aug_cfg=aug_cfg)
    val = image_transform(pp.size, is_train=False, mean=mean, std=std,
                          interpolation=pp.interpolation, resize_mode=pp.resize_mode)
    return model, train, val


def get_tokenizer(model_name: Optional[str] = "coca_ViT-B-32", context_length: Optional[int] = None,
                  pretrained: Optional[str] = None) -> Tokenizer:
    """The CLIP BPE tokenizer with the model's context length (76 for the CoCa configs)."""
    if model_name is None and pretrained is not None:
        cfg = resolve_config(None, str(pretrained))[0]  # the config stored with the weights
    else:
        cfg = get_model_config(model_name) if model_name is not None else None
    if cfg is not None and cfg.text_cfg.hf_tokenizer_name:
        from ..model.hf_text import HFTokenizer

        return HFTokenizer(cfg.text_cfg.hf_tokenizer_name, context_length or cfg.text_cfg.context_length)
    return Tokenizer(context_length=context_length or (cfg.text_cfg.context_length if cfg else 77))
