"""Model configuration: small dataclasses read from open_clip-style JSON files in ``models/``.

A config file has ``embed_dim``, ``vision_cfg``, ``text_cfg`` and ``multimodal_cfg`` (the
same schema as open_clip's ``model_configs``), so configs can be moved between the two.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from ..errors import CocaError


@dataclass
class CLIPVisionCfg:
    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: Union[int, Tuple[int, int]] = 224  # a side, or (height, width)
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
    hf_model_pretrained: bool = field(default=True, compare=False)  # how it is built, not what is built
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
        """The config in ``raw`` (a parsed JSON object), checked before any tensor is allocated."""
        if not isinstance(raw, dict):
            raise CocaError(f"model config {name} must be a JSON object")
        raw = dict(raw)
        raw.pop("custom_text", None)  # open_clip flag; CoCa always has its own text tower
        try:
            cfg = cls(
                embed_dim=raw.pop("embed_dim"),
                vision_cfg=_build(CLIPVisionCfg, raw.pop("vision_cfg", {}), f"{name}: vision_cfg"),
                text_cfg=_build(CLIPTextCfg, raw.pop("text_cfg", {}), f"{name}: text_cfg"),
                multimodal_cfg=_build(MultimodalCfg, raw.pop("multimodal_cfg", {}), f"{name}: multimodal_cfg"),
                name=name,
                **_known(cls, raw, name),
            )
        except KeyError as missing:
            raise CocaError(f"model config {name} lacks the required key {missing}") from None
        problem = _problem(cfg)
        if problem:
            raise CocaError(f"model config {name}: {problem}")
        return cfg

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


# CoCaConfig fields that are not plain values: the three sections, and the name it is known by.
_NOT_VALUES = {"vision_cfg", "text_cfg", "multimodal_cfg", "name"}


def _known(cls, raw: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)} - _NOT_VALUES
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


# -- validation: a config is checked whole before a model is built from it ----------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each field type accepts (the annotations are strings: ``from __future__ import annotations``).
_BY_TYPE = {
    "int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "float": (_is_number, "a finite number"),
    "Optional[float]": (lambda v: v is None or _is_number(v), "a finite number or null"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "Optional[str]": (lambda v: v is None or isinstance(v, str), "a string or null"),
}
# Fields whose valid range is not their type's.
_BY_NAME = {
    "pad_id": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "mlp_ratio": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "patch_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number from 0 to below 1"),
    "image_size": (lambda v: _is_int(v) and v > 0 or isinstance(v, (list, tuple)) and len(v) == 2
                   and all(_is_int(side) and side > 0 for side in v), "a positive integer or [height, width]"),
}


def pair(size) -> tuple[int, int]:
    """(height, width) of an ``image_size``: one side, or both."""
    return (size, size) if _is_int(size) else (size[0], size[1])


def _shown(value) -> str:
    """A value as the JSON file spells it (2.5, "12", true, null)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _field_problem(section, prefix: str) -> Optional[str]:
    for f in dataclasses.fields(section):
        if f.name in _NOT_VALUES:
            continue
        valid, expected = _BY_NAME.get(f.name) or _BY_TYPE[f.type]
        value = getattr(section, f.name)
        if not valid(value):
            return f"{prefix}{f.name} must be {expected}, got {_shown(value)}"
    return None


def _problem(cfg: "CoCaConfig") -> Optional[str]:
    """What makes ``cfg`` unbuildable (wrong types, sizes that are not positive, widths that do not
    split into heads, towers that do not fit together), naming the field; None when it is sound."""
    for section, prefix in ((cfg, ""), (cfg.vision_cfg, "vision_cfg."), (cfg.text_cfg, "text_cfg."),
                            (cfg.multimodal_cfg, "multimodal_cfg.")):
        problem = _field_problem(section, prefix)
        if problem:
            return problem
    vision, text, decoder = cfg.vision_cfg, cfg.text_cfg, cfg.multimodal_cfg
    # the decoder cross-attends to the image tokens: pooled to embed_dim, or the ViT's own width
    image_tokens = ("embed_dim", cfg.embed_dim) if vision.attentional_pool else ("vision_cfg.width", vision.width)
    multiples = [("vision_cfg.width", vision.width, "vision_cfg.head_width", vision.head_width),
                 ("multimodal_cfg.width", decoder.width, "multimodal_cfg.heads", decoder.heads)]
    equal = [("multimodal_cfg.width", decoder.width, *image_tokens)]
    if vision.attentional_pool:
        multiples.append(("embed_dim", cfg.embed_dim, "vision_cfg.attn_pooler_heads", vision.attn_pooler_heads))
    if not text.hf_model_name:  # a Hugging Face tower's sizes are its own config's
        multiples.append(("text_cfg.width", text.width, "text_cfg.heads", text.heads))
        # the decoder continues the text encoder's token embeddings
        equal.append(("multimodal_cfg.width", decoder.width, "text_cfg.width", text.width))
    for name, value, divisor_name, divisor in multiples:
        if value % divisor:
            return f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})"
    for name, value, other_name, other in equal:
        if value != other:
            return f"{name} ({value}) must equal {other_name} ({other})"
    if vision.patch_size > min(pair(vision.image_size)):
        return (f"vision_cfg.patch_size ({vision.patch_size}) must not exceed "
                f"vision_cfg.image_size ({_shown(vision.image_size)})")
    if text.pad_id >= text.vocab_size:
        return f"text_cfg.pad_id ({text.pad_id}) must be below text_cfg.vocab_size ({text.vocab_size})"
    return None


# -- size: from the config alone, so that an absurd one is refused before it is built ---------

def _block_parameters(width: int, mlp_ratio: float, ls_init_value, cross: bool = False) -> int:
    """One pre-norm transformer block (layers.ResidualBlock)."""
    hidden = int(width * mlp_ratio)
    attention = 4 * width * width + 4 * width  # fused q/k/v weight and bias, output projection
    mlp = 2 * width * hidden + hidden + width
    norms = (3 if cross else 2) * 2 * width
    return attention + mlp + norms + (2 * width if ls_init_value is not None else 0)


def parameter_counts(cfg: "CoCaConfig") -> dict[str, int]:
    """Parameters of each part of the model ``cfg`` describes, by section, computed from its sizes:
    nothing is built, so a config claiming ten million layers costs nothing. A Hugging Face text
    tower is not counted: its size is in its hub config, which is not fetched to check a config.
    tests/test_trust_memory.py checks the sum against models built on the meta device."""
    embed, vision, text, decoder = cfg.embed_dim, cfg.vision_cfg, cfg.text_cfg, cfg.multimodal_cfg
    width, (rows, columns) = vision.width, (side // vision.patch_size for side in pair(vision.image_size))
    image = (3 * width * vision.patch_size ** 2 + width + (rows * columns + 1) * width
             + (0 if vision.no_ln_pre else 2 * width)
             + vision.layers * _block_parameters(width, vision.mlp_ratio, vision.ls_init_value))
    pooled = width
    if vision.attentional_pool:
        pooled = embed
        attention = 2 * embed * embed + 2 * embed * width + 4 * embed  # q/out from embed_dim, k/v from the ViT
        image += vision.attn_pooler_queries * embed + attention + 2 * embed + 2 * width
    image += 2 * pooled + pooled * embed
    if text.hf_model_name:
        words = 0
    else:
        cls = 1 if text.embed_cls else 0
        words = (text.vocab_size * text.width + cls * text.width + (text.context_length + cls) * text.width
                 + text.layers * _block_parameters(text.width, text.mlp_ratio, text.ls_init_value)
                 + 2 * text.width + text.width * embed + (embed if text.proj_bias else 0))
    blocks = (_block_parameters(decoder.width, decoder.mlp_ratio, decoder.ls_init_value)
              + _block_parameters(decoder.width, decoder.mlp_ratio, decoder.ls_init_value, cross=True))
    captions = decoder.layers * blocks + 2 * decoder.width + decoder.width * text.vocab_size
    logits = 1 + (1 if cfg.init_logit_bias is not None else 0)
    return {"vision_cfg": image, "text_cfg": words, "multimodal_cfg": captions, "logit_scale": logits}


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


def read_config_file(path) -> dict:
    """The JSON object in a config file, any failure to read it as one CocaError."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CocaError(f"cannot read model config {path}: {err}") from None
    if not isinstance(raw, dict):
        raise CocaError(f"model config {path} must be a JSON object")
    return raw


def _read_config(path, name: str) -> CoCaConfig:
    raw = read_config_file(path)
    raw = raw.get("model_cfg", raw)  # open_clip's hub `open_clip_config.json` nests it
    return CoCaConfig.from_dict(raw, name=name)
