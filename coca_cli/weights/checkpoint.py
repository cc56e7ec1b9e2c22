"""Reading and writing weights, without ever running code from a file.

Native weights are a directory with ``model.safetensors`` and ``config.json``. open_clip
checkpoints (``.pt``/``.bin`` pickles, training checkpoints with ``state_dict`` and
``module.`` prefixes, ``.safetensors``, hub folders with ``open_clip_config.json``) and
``coca train``'s own checkpoints (which carry their model config) are read with
``torch.load(weights_only=True)``, which refuses pickles that would execute code.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..model.config import CoCaConfig, builtin_name, get_model_config, read_config_file
from ..errors import CocaError
from ..files import atomic_torch_save, atomic_write, claim_folder

NATIVE_WEIGHTS = "model.safetensors"
NATIVE_CONFIG = "config.json"
OPENCLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPENCLIP_SAFE_WEIGHTS = "open_clip_model.safetensors"
OPENCLIP_CONFIG = "open_clip_config.json"
TRAINING_CHECKPOINT = "coca-train-checkpoint"  # the "format" of the checkpoints `coca train` writes
# What coca writes in a weights folder: a folder holding anything else is not written into.
WEIGHTS_FOLDER = (NATIVE_WEIGHTS, NATIVE_CONFIG, OPENCLIP_WEIGHTS, OPENCLIP_CONFIG)


def find_weights(path: Path) -> Path:
    """The weights file inside a native or open_clip directory, or the path itself."""
    if not path.is_dir():
        return path
    for name in (NATIVE_WEIGHTS, OPENCLIP_SAFE_WEIGHTS, OPENCLIP_WEIGHTS):
        if (path / name).is_file():
            return path / name
    raise CocaError(f"no weights in {path} (expected {NATIVE_WEIGHTS}, {OPENCLIP_SAFE_WEIGHTS} or {OPENCLIP_WEIGHTS})")


def find_config(path: Path) -> Optional[Path]:
    """The model config stored beside weights, if any (native or open_clip hub layout)."""
    folder = path if path.is_dir() else path.parent
    for name in (NATIVE_CONFIG, OPENCLIP_CONFIG):
        if (folder / name).is_file():
            return folder / name
    return None


def stored_config(weights: Path) -> Optional[CoCaConfig]:
    """The model config that travels with the weights: inside a ``coca train`` checkpoint, or
    ``config.json`` / ``open_clip_config.json`` beside them; None when there is none."""
    if weights.is_file() and weights.suffix != ".safetensors":
        try:
            checkpoint = load_torch_file(weights, mmap=True)
        except CocaError:  # not a readable pickle: loading the weights reports why
            checkpoint = None
        if _is_training_checkpoint(checkpoint):
            cfg = CoCaConfig.from_dict(checkpoint.get("model_config"), name=str(weights))
            cfg.name = builtin_name(cfg) or cfg.name  # results then name the model trained, e.g. coca_tiny
            return cfg
    found = find_config(weights)
    return get_model_config(found) if found is not None else None


def stored_preprocess(weights: Path) -> dict:
    """The ``preprocess_cfg`` of an open_clip hub config beside the weights (mean, std, resize), or {}."""
    found = find_config(weights)
    stored = read_config_file(found).get("preprocess_cfg") if found and found.name == OPENCLIP_CONFIG else None
    return stored if isinstance(stored, dict) else {}


def _is_training_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from any supported checkpoint format, keys cleaned of ``module.`` prefixes."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CocaError(f"checkpoint not found: {path}")
    path = find_weights(path)
    if path.stat().st_size == 0:
        raise CocaError(f"checkpoint is empty: {path}")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CocaError(f"cannot read {path}: not a valid safetensors file ({_first_line(err)})") from None
    else:
        state = _load_pickle(path)
    if not state:
        raise CocaError(f"checkpoint {path} holds no tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_torch_file(path: Path, mmap: bool = False):
    """``torch.load(weights_only=True)``, which never runs code from the file, failing with one
    line of ours: torch's own message for a refused pickle advises ``weights_only=False``, that is,
    running the file's code. ``mmap`` maps a zip checkpoint instead of reading it, so the optimizer
    state of a training checkpoint is never read into memory when only the model is wanted."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; we report errors ourselves
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways: one line for all
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):  # also TorchScript, legacy .tar
            raise CocaError(_refusal(path, err)) from None
        raise CocaError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or truncated "
                       f"({_first_line(err)})") from None


def _refusal(path: Path, err: Exception) -> str:
    """Why a file was refused and what to do instead, naming the Python object it wanted (torch
    names it as ``GLOBAL module.name``) but never repeating torch's advice to trust the file."""
    wanted = re.search(r"GLOBAL (\S+)", str(err))
    what = (f"it holds Python objects ({wanted.group(1)}) that could run code when loaded" if wanted else
            "damaged, or a pickle that could run code when loaded")  # torch cannot tell these apart
    return (f"refusing to load {path}: not a plain-tensor PyTorch checkpoint ({what}). Save the weights as a state "
            "dict of tensors or as .safetensors with the program that made them, and pass that file")


def _load_pickle(path: Path) -> dict:
    obj = load_torch_file(path, mmap=True)
    if _is_training_checkpoint(obj):
        obj = obj.get("model")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CocaError(f"{path} is not a state dict of tensors")
    return obj


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str,
               partial: bool = False) -> dict[str, torch.Tensor]:
    """Raise a CocaError naming missing (unless ``partial``), unexpected or mis-shaped keys; fix
    benign differences."""
    expected = model.state_dict()
    state = dict(state)
    if "logit_scale" in state and "logit_scale" in expected:  # a scalar, or [1] (nonscalar_logit_scale)
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = [] if partial else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong_shape:
        problems.append("shape mismatch: " + _names(
            [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]))
    if problems:
        raise CocaError(f"checkpoint {source} does not fit the model config: " + "; ".join(problems))
    return state


def _names(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike, resize_positions: bool = False) -> None:
    """The weights at ``path``, which must fit ``model`` exactly; with ``resize_positions``, up to the
    lengths of the positional embeddings (see :func:`resized_positions`)."""
    state = load_state_dict(path)
    if resize_positions:
        state = resized_positions(model, state)
    model.load_state_dict(check_fits(model, state, str(path)), strict=True)


def load_tower_weights(tower: nn.Module, path: str | os.PathLike, argument: str) -> None:
    """open_clip's ``pretrained_image_path`` / ``pretrained_text_path``: one tower's state dict, loaded
    over the model's weights. It may hold only part of the tower (open_clip loads it with
    ``strict=False``), but a key the tower lacks or a shape it does not have is an error, where
    open_clip would log it and go on without those weights."""
    tower.load_state_dict(check_fits(tower, load_state_dict(path), f"{path} ({argument})", partial=True),
                          strict=False)


def resized_positions(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its positional embeddings interpolated to ``model``'s image grid and text length,
    as open_clip does whenever it loads weights, so that a model made with ``force_image_size`` or
    ``force_context_length`` takes the weights of its config: the grid of patch positions bicubically
    (the class token's position kept), the text positions linearly. Embeddings of another width, or
    from a grid that is not square, are left for :func:`check_fits` to report."""
    state = dict(state)
    grid = state.get("visual.positional_embedding")  # [1 + side * side, width]: class token first
    if _other_length(grid, model.visual.positional_embedding) and math.isqrt(len(grid) - 1) ** 2 == len(grid) - 1:
        side, (rows, columns) = math.isqrt(len(grid) - 1), model.visual.grid_size
        patches = grid[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(rows, columns), mode="bicubic", antialias=True, align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(rows * columns, -1)
        state["visual.positional_embedding"] = torch.cat([grid[:1], patches])
    text = state.get("text.positional_embedding")
    if _other_length(text, getattr(model.text, "positional_embedding", None)):  # a Hugging Face tower has none
        positions = F.interpolate(text.T[None], size=model.text.positional_embedding.shape[0], mode="linear",
                                  align_corners=False)
        state["text.positional_embedding"] = positions[0].T
    return state


def _other_length(stored: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> bool:
    """Both are tables of positions of the same width, of different lengths."""
    return (stored is not None and expected is not None and stored.shape[0] != expected.shape[0]
            and stored.shape[1:] == expected.shape[1:])


# -- writing ---------------------------------------------------------------------------------

def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_native(model: nn.Module, config: CoCaConfig, output: str | os.PathLike) -> Path:
    """``DIR/model.safetensors`` + ``DIR/config.json``: what every ``--pretrained`` accepts.

    ``DIR`` must be new, empty or a weights folder coca wrote (see :data:`WEIGHTS_FOLDER`)."""
    out = Path(output)
    claim_folder(out, WEIGHTS_FOLDER)
    state = _contiguous(model.state_dict())
    atomic_write(out / NATIVE_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(out / NATIVE_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def save_openclip(model: nn.Module, config: CoCaConfig, output: str | os.PathLike, preprocess: dict) -> Path:
    """open_clip's hub layout, loadable by ``open_clip.create_model('local-dir:DIR')`` or strictly."""
    out = Path(output)
    claim_folder(out, WEIGHTS_FOLDER)
    state = _contiguous(model.state_dict())
    atomic_torch_save(out / OPENCLIP_WEIGHTS, state)
    text = json.dumps({"model_cfg": config.to_dict(), "preprocess_cfg": preprocess}, indent=2) + "\n"
    atomic_write(out / OPENCLIP_CONFIG, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out
