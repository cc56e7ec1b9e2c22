"""Model configuration: small dataclasses read from open_clip-style JSON files in ``models/``.

A config file has ``embed_dim``, ``vision_cfg``, ``text_cfg`` and ``multimodal_cfg`` (the
same schema as open_clip's ``model_configs``), so configs can be moved between the two.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..errors import CocaError


@dataclass
class CLIPVisionCfg:
    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    ls_init_value: Optional[float] = None
    patch_dropout: float = 0.0
    attentional_pool: bool = False  # CoCa: pool image tokens with learned queries
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pool_type: str = "tok"  # 'tok' (class token) or 'avg'; ignored with attentional_pool
    final_ln_after_pool: bool = False
    output_tokens: bool = False


@dataclass
class CLIPTextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False  # CoCa: append a learned CLS token, pooled for the contrastive feature
    pad_id: int = 0
    pool_type: str = "argmax"
    proj_bias: bool = False
    output_tokens: bool = False
    # Hugging Face text tower (coca_roberta-ViT-B-32); needs the optional `hf` extra.
    hf_model_name: Optional[str] = None
    hf_tokenizer_name: Optional[str] = None
    hf_model_pretrained: bool = True
    hf_proj_type: str = "mlp"
    hf_pooler_type: str = "mean_pooler"


@dataclass
class MultimodalCfg(CLIPTextCfg):
    mlp_ratio: float = 4.0
    dim_head: int = 64
    heads: int = 8
    n_queries: int = 256
    attn_pooler_heads: int = 8


@dataclass
class CoCaConfig:
    """Everything needed to build a CoCa model, as stored in ``models/*.json``."""

    embed_dim: int
    vision_cfg: CLIPVisionCfg
    text_cfg: CLIPTextCfg
    multimodal_cfg: MultimodalCfg
    quick_gelu: bool = False
    init_logit_scale: Optional[float] = None
    init_logit_bias: Optional[float] = None
    name: str = field(default="custom", compare=False)

    @classmethod
    def from_dict(cls, raw: dict, name: str = "custom") -> "CoCaConfig":
        raw = dict(raw)
        raw.pop("custom_text", None)  # open_clip flag; CoCa always has its own text tower
        try:
            return cls(
                embed_dim=raw.pop("embed_dim"),
                vision_cfg=_build(CLIPVisionCfg, raw.pop("vision_cfg", {}), f"{name}: vision_cfg"),
                text_cfg=_build(CLIPTextCfg, raw.pop("text_cfg", {}), f"{name}: text_cfg"),
                multimodal_cfg=_build(MultimodalCfg, raw.pop("multimodal_cfg", {}), f"{name}: multimodal_cfg"),
                name=name,
                **_known(cls, raw, name),
            )
        except KeyError as missing:
            raise CocaError(f"model config {name} lacks the required key {missing}") from None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("name")
        for key in ("init_logit_scale", "init_logit_bias"):
            if out[key] is None:
                out.pop(key)
        for section, defaults in (("vision_cfg", CLIPVisionCfg()), ("text_cfg", CLIPTextCfg()), ("multimodal_cfg", MultimodalCfg())):
            # Store only what differs from the defaults, like the hand-written files.
            out[section] = {k: v for k, v in out[section].items() if getattr(defaults, k) != v}
        out["custom_text"] = True  # lets open_clip read the file as-is
        return out


def _known(cls, raw: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - {"vision_cfg", "text_cfg", "multimodal_cfg", "name"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CocaError(f"model config {where} has unsupported keys: {', '.join(unknown)}")
    return raw


def _build(cls, raw: Any, where: str):
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise CocaError(f"model config {where} must be a JSON object")
    return cls(**_known(cls, raw, where))


# -- the config registry ----------------------------------------------------------------------

def _config_dir():
    """Configs ship inside the wheel as ``coca_cli/model_configs``; in a checkout they are ``models/``."""
    packaged = resources.files("coca_cli") / "model_configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "models"


def _registry() -> dict:
    return {p.name[:-5]: p for p in _config_dir().iterdir() if p.name.endswith(".json")}


def list_models() -> list[str]:
    """Names of the built-in model configs."""
    return sorted(_registry(), key=str.lower)


def suggest(name: str, choices) -> str:
    """' (did you mean: a, b?)' for a mistyped name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def get_model_config(model: str | Path) -> CoCaConfig:
    """A config by built-in name (e.g. ``coca_ViT-B-32``) or by path to a JSON file."""
    registry = _registry()
    name = str(model)
    if name in registry:
        return _read_config(registry[name], name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise CocaError(f"model config file not found: {path}")
        cfg = _read_config(path, str(path))
        cfg.name = builtin_name(cfg) or cfg.name
        return cfg
    raise CocaError(f"unknown model '{name}'{suggest(name, registry)}; `coca models` lists them")


def builtin_name(cfg: CoCaConfig) -> Optional[str]:
    """The built-in config that ``cfg`` is (names aside), e.g. for the config.json in a folder that
    ``coca convert`` or training wrote, so that results can say which model they come from."""
    return next((name for name, path in _registry().items() if _read_config(path, name) == cfg), None)


def _read_config(path, name: str) -> CoCaConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CocaError(f"cannot read model config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise CocaError(f"model config {path} must be a JSON object")
    raw = raw.get("model_cfg", raw)  # open_clip's hub `open_clip_config.json` nests it
    return CoCaConfig.from_dict(raw, name=name)
