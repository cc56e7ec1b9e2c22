"""Building models, transforms and tokenizers by name, with open_clip's arguments.

Code written for open_clip 3.3.0's CoCa API runs unchanged after ``import coca_cli as open_clip``:
``create_model``, ``create_model_and_transforms``, ``create_model_from_pretrained`` and
``get_tokenizer`` take every keyword open_clip's do (tests/test_dropin.py checks them against the
installed open_clip) and do what open_clip does with them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import (find_weights, load_tower_weights, load_weights as load_checkpoint, stored_config,
                         stored_preprocess)
from ..model.config import CoCaConfig, get_model_config, parameter_counts
from ..errors import CocaError
from ..model.coca import CoCa
from .pretrained import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, download_config, hub_repo, resolve
from ..data.tokenizer import DEFAULT_CONTEXT_LENGTH, Tokenizer
from ..data.transforms import PreprocessCfg, image_transform_v2

# open_clip's precision names: (dtype of the weights, whether layer norms compute in fp32). "fp16" and
# "bf16" cast the whole model and keep the norms' arithmetic in fp32 (open_clip keeps some parameters
# fp32 instead, which its own CoCa cannot run with); "pure_" casts norms too; the "amp" names are for
# training under autocast, where the weights stay fp32.
PRECISIONS = {
    "fp32": (torch.float32, False), "amp": (torch.float32, False), "amp_bf16": (torch.float32, False),
    "amp_bfloat16": (torch.float32, False), "fp16": (torch.float16, True), "bf16": (torch.bfloat16, True),
    "pure_fp16": (torch.float16, False), "pure_bf16": (torch.bfloat16, False),
}
# What open_clip's **model_kwargs may hold: config fields, replaced whole, and CoCa's other keywords.
CONFIG_FIELDS = {f.name for f in dataclasses.fields(CoCaConfig)} - {"name"}
CONSTRUCTOR_OPTIONS = ("nonscalar_logit_scale", "pad_id")
PREPROCESS_SETTINGS = tuple(f.name for f in dataclasses.fields(PreprocessCfg))
# open_clip's tokenizer options at the values coca's CLIP tokenizer implements; other values are refused.
CLIP_TOKENIZER_OPTIONS = {"clean": "lower", "reduction_mask": "", "additional_special_tokens": None}


def locate(model_name: Optional[str], pretrained: Optional[str] = None,
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
    return cfg, weights


def resolve_config(model_name: Optional[str], pretrained: Optional[str] = None,
                   cache_dir: Optional[str] = None) -> tuple[CoCaConfig, Optional[Path]]:
    """:func:`locate`, refusing a config too large for its weights or for this machine."""
    cfg, weights = locate(model_name, pretrained, cache_dir)
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


def prefetch(model_name: Optional[str], pretrained: Optional[str] = None, cache_dir: Optional[str] = None) -> None:
    """Check, and download once, the config and weights that ``create_model`` would load, failing
    in one line: before a command starts a process per GPU, each of which would otherwise fail (or
    download) on its own. Warnings are left to the processes, which say them when they load."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolve_config(*split_model_name(model_name, pretrained), cache_dir)


def split_model_name(model_name: Optional[str], pretrained) -> tuple[Optional[str], Optional[str]]:
    """open_clip's ``hf-hub:org/repo`` and ``local-dir:PATH`` model names: weights that carry their
    config, which here are ``pretrained`` with no model name. open_clip then ignores ``pretrained``."""
    name = str(model_name or "")
    for prefix, kept in ((HF_HUB_PREFIX, HF_HUB_PREFIX), (LOCAL_DIR_PREFIX, "")):
        if name.startswith(prefix):
            if not name[len(prefix):]:
                raise CocaError(f"model name '{name}' names no {'repository' if kept else 'folder'}")
            if prefix == LOCAL_DIR_PREFIX and not Path(name[len(prefix):]).expanduser().is_dir():
                raise CocaError(f"model name '{name}': no such folder")
            if pretrained:
                warnings.warn(f"pretrained={str(pretrained)!r} is ignored: model '{name}' brings its own weights")
            return None, kept + name[len(prefix):]
    return model_name, str(pretrained) if pretrained else None


def create_model(
    model_name: Optional[str] = "coca_ViT-B-32",
    pretrained: Optional[str | os.PathLike] = None,
    load_weights: bool = True,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    jit: bool = False,
    force_quick_gelu: bool = False,
    force_custom_text: bool = False,
    force_patch_dropout: Optional[float] = None,
    force_image_size: Optional[int | tuple[int, int]] = None,
    force_preprocess_cfg: Optional[dict] = None,
    force_context_length: Optional[int] = None,
    pretrained_image: bool = False,
    pretrained_text: bool = True,
    pretrained_image_path: Optional[str | os.PathLike] = None,
    pretrained_text_path: Optional[str | os.PathLike] = None,
    cache_dir: Optional[str] = None,
    output_dict: Optional[bool] = None,
    require_pretrained: bool = False,
    weights_only: bool = True,
    **model_kwargs,
) -> CoCa:
    """A CoCa model in eval mode, from open_clip's arguments.

    ``model_name``: a config name or JSON path; ``hf-hub:org/repo`` or ``local-dir:PATH``; or None for
    the config stored with ``pretrained`` (a published tag, ``hf-hub:`` name or local path).
    ``load_weights=False`` leaves the weights random (the config may still come from them).

    As in open_clip: ``force_quick_gelu``, ``force_patch_dropout``, ``force_image_size`` and
    ``force_context_length`` change the config, and positional embeddings of the weights are
    interpolated to a forced size; ``pretrained_text`` (older name ``pretrained_hf``) loads a Hugging
    Face text tower's own weights when no checkpoint replaces them; ``pretrained_image_path`` /
    ``pretrained_text_path`` load one tower's weights afterwards; ``require_pretrained`` refuses to go
    on without weights; ``model_kwargs`` replace config fields or go to ``CoCa``
    (``nonscalar_logit_scale``, ``pad_id``). ``model.visual.preprocess_cfg`` records how images are
    to be prepared; ``force_preprocess_cfg`` overrides its settings.

    Accepted and without effect, as for open_clip's CoCa: ``force_custom_text`` (CoCa's text tower
    is always its own), ``pretrained_image`` (timm image towers only; no CoCa config has one) and
    ``output_dict`` (CoCa's forward always returns a dict). ``weights_only=False`` does not open
    pickles that would run code either: coca always loads with ``weights_only=True``. ``jit=True``
    is an error: TorchScript is not supported.
    """
    if jit:
        raise CocaError("jit=True (TorchScript) is not supported: for a compiled model, pass compile=True "
                        "to model.generate (coca caption --compile)")
    if precision not in PRECISIONS:
        raise CocaError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    dtype, fp32_norms = PRECISIONS[precision]
    pretrained_text = model_kwargs.pop("pretrained_hf", pretrained_text)
    constructor = {key: model_kwargs.pop(key) for key in CONSTRUCTOR_OPTIONS if key in model_kwargs}
    unknown = sorted(set(model_kwargs) - CONFIG_FIELDS)
    if unknown:
        raise CocaError(f"unknown model option '{unknown[0]}'")
    model_name, pretrained = split_model_name(model_name, pretrained)
    cfg, weights = locate(model_name, pretrained, cache_dir)
    if not load_weights:
        weights = None
    if require_pretrained and weights is None:
        raise CocaError(f"pretrained weights are required here: pass pretrained= (a published tag, "
                        f"hf-hub:org/repo or a local path){'' if load_weights else ', and load_weights=True'}")
    changes = dict(quick_gelu=force_quick_gelu, patch_dropout=force_patch_dropout, image_size=force_image_size,
                   context_length=force_context_length,
                   hf_model_pretrained=bool(pretrained_text) and pretrained_text_path is None and weights is None)
    cfg = changed_config(cfg, changes, model_kwargs)
    check_size(cfg, weights)
    stored = stored_preprocess(weights) if weights is not None and model_name is None else {}
    preprocess = preprocess_settings(cfg, stored, force_preprocess_cfg)

    model = CoCa.from_config(cfg, cast_dtype=dtype if fp32_norms else None, **constructor)
    if weights is not None:
        load_checkpoint(model, weights, resize_positions=True)
    for tower, path, argument in ((model.visual, pretrained_image_path, "pretrained_image_path"),
                                  (model.text, pretrained_text_path, "pretrained_text_path")):
        if path:
            load_tower_weights(tower, path, argument)
    model.visual.preprocess_cfg = preprocess
    model.visual.image_mean, model.visual.image_std = preprocess["mean"], preprocess["std"]  # open_clip's older names
    return model.to(device=device, dtype=dtype).eval()


def changed_config(cfg: CoCaConfig, changes: dict, fields: dict) -> CoCaConfig:
    """``cfg`` with create_model's ``force_*`` ``changes`` (None leaves a setting as it is) and then
    whole config ``fields`` replaced, as open_clip orders them; checked again like a config file."""
    raw = cfg.to_dict()
    if changes["quick_gelu"]:
        raw["quick_gelu"] = True
    for section, key in (("vision_cfg", "patch_dropout"), ("vision_cfg", "image_size"),
                         ("text_cfg", "context_length")):
        if changes[key] is not None:
            raw[section][key] = changes[key]
    if cfg.text_cfg.hf_model_name:
        raw["text_cfg"]["hf_model_pretrained"] = changes["hf_model_pretrained"]
    raw.update(fields)
    return CoCaConfig.from_dict(raw, name=cfg.name)


def preprocess_settings(cfg: CoCaConfig, stored: dict, forced: Optional[dict]) -> dict:
    """open_clip's ``model.visual.preprocess_cfg``: CoCa's defaults, what a hub config ``stored``, the
    model's image size, then the ``forced`` settings that are not None."""
    forced = {key: value for key, value in (forced or {}).items() if value is not None}
    unknown = sorted(set(forced) - set(PREPROCESS_SETTINGS))
    if unknown:
        raise CocaError(f"unknown preprocessing setting '{unknown[0]}' (known: {', '.join(PREPROCESS_SETTINGS)})")
    settings = {**dataclasses.asdict(PreprocessCfg()), **{k: v for k, v in stored.items() if k in PREPROCESS_SETTINGS},
                "size": cfg.vision_cfg.image_size, **forced}
    try:
        image_transform_v2(PreprocessCfg(**settings), is_train=False)  # refuses what it cannot do
    except (TypeError, ValueError) as err:
        raise CocaError(f"preprocessing: {err}") from None
    return settings


def preprocess_config(model: CoCa) -> PreprocessCfg:
    """How images are prepared for ``model``: what create_model recorded, else CoCa's defaults (OpenAI's
    mean and std, bicubic resize of the short side, center crop) at the model's image size."""
    recorded = getattr(model.visual, "preprocess_cfg", None)
    return PreprocessCfg(**recorded) if recorded else PreprocessCfg(size=model.visual.image_size)


def create_model_and_transforms(
    model_name: Optional[str] = "coca_ViT-B-32",
    pretrained: Optional[str | os.PathLike] = None,
    *,
    image_mean: Optional[tuple[float, ...]] = None,
    image_std: Optional[tuple[float, ...]] = None,
    image_interpolation: Optional[str] = None,
    image_resize_mode: Optional[str] = None,
    aug_cfg: Optional[dict] = None,
    **options,
):
    """(model, train transform, eval transform), like ``open_clip.create_model_and_transforms``.

    ``image_*`` override the model's preprocessing (``image_interpolation`` and ``image_resize_mode``
    apply to the eval transform only, as in open_clip), ``aug_cfg`` sets the training augmentation,
    and ``options`` are :func:`create_model`'s.
    """
    forced = dict(mean=image_mean, std=image_std, interpolation=image_interpolation, resize_mode=image_resize_mode)
    model = create_model(model_name, pretrained, force_preprocess_cfg=forced, **options)
    settings = preprocess_config(model)
    train = image_transform_v2(settings, is_train=True, aug_cfg=aug_cfg)
    return model, train, image_transform_v2(settings, is_train=False)


def create_model_from_pretrained(model_name: Optional[str] = "coca_ViT-B-32",
                                 pretrained: Optional[str | os.PathLike] = None, *, return_transform: bool = True,
                                 **options):
    """(model, eval transform), or the model alone with ``return_transform=False``, like open_clip's:
    weights are required. ``options`` are :func:`create_model_and_transforms`'."""
    model, _, transform = create_model_and_transforms(model_name, pretrained, require_pretrained=True, **options)
    return (model, transform) if return_transform else model


def get_tokenizer(model_name: Optional[str] = "coca_ViT-B-32", context_length: Optional[int] = None,
                  cache_dir: Optional[str] = None, *, pretrained: Optional[str] = None, **options):
    """The model's tokenizer, with its context length (76 for the CoCa configs), like open_clip's.

    ``model_name`` as for :func:`create_model`; None or "" (open_clip's default) with no
    ``pretrained`` gives CLIP's tokenizer of 77 tokens. ``cache_dir``: where a Hugging Face
    tokenizer is downloaded. ``options``: open_clip's tokenizer options, ``bpe_path`` and the
    others at the values coca implements (``clean="lower"``).
    """
    model_name, pretrained = split_model_name(model_name or None, pretrained)
    repo = hub_repo(None, pretrained) if model_name is None and pretrained is not None else None
    if repo is not None:  # the repository's config, not its weights
        cfg = get_model_config(download_config(repo, cache_dir))
    elif model_name is None and pretrained is not None:
        cfg = resolve_config(None, pretrained, cache_dir)[0]  # the config stored with the weights
    else:
        cfg = get_model_config(model_name) if model_name is not None else None
    length = context_length or (cfg.text_cfg.context_length if cfg else DEFAULT_CONTEXT_LENGTH)
    if cfg is not None and cfg.text_cfg.hf_tokenizer_name:
        if options:
            raise CocaError(f"tokenizer options are not supported for Hugging Face tokenizers: {', '.join(options)}")
        from ..model.hf_text import HFTokenizer

        return HFTokenizer(cfg.text_cfg.hf_tokenizer_name, length, cache_dir=cache_dir)
    bpe_path = options.pop("bpe_path", None)
    for key, value in options.items():
        if key not in CLIP_TOKENIZER_OPTIONS or CLIP_TOKENIZER_OPTIONS[key] != value:
            implemented = ", ".join(f"{k}={v!r}" for k, v in CLIP_TOKENIZER_OPTIONS.items())
            raise CocaError(f"tokenizer option {key}={value!r} is not supported (coca's tokenizer is CLIP's, "
                            f"with {implemented})")
    return Tokenizer(bpe_path, context_length=length)
