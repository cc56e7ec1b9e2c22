"""What ``coca models`` lists: each config's size and inputs, its published weights, and which of
those are already downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..model.config import CoCaConfig, get_model_config, list_models
from .pretrained import PRETRAINED, cached_weights


@dataclass
class Published:
    tag: str
    repo: str  # the Hugging Face repository it is downloaded from
    cached: bool  # already in the local cache: no download needed


@dataclass
class ModelInfo:
    name: str
    parameters: Optional[int]  # None for a Hugging Face text tower (see count_parameters)
    image_size: int
    context_length: int  # text tokens the model reads
    pretrained: list[Published]


def count_parameters(cfg: CoCaConfig) -> Optional[int]:
    """Parameters of the model ``cfg`` builds, counted on the meta device: no memory is allocated
    and nothing initialised, so even ViT-L costs a fraction of a second. None for a Hugging Face
    text tower, whose size only its hub config tells (a listing must not go online)."""
    import torch

    from ..model.coca import CoCa

    if cfg.text_cfg.hf_model_name:
        return None
    with torch.device("meta"):
        model = CoCa.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def describe_models() -> list[ModelInfo]:
    """Every built-in config, in ``list_models`` order."""
    infos = []
    for name in list_models():
        cfg = get_model_config(name)
        published = [Published(tag, repo, cached_weights(repo) is not None)
                     for tag, repo in PRETRAINED.get(name, {}).items()]
        infos.append(ModelInfo(name, count_parameters(cfg), cfg.vision_cfg.image_size, cfg.text_cfg.context_length,
                               published))
    return infos
