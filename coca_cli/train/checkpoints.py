"""What a run writes to resume: checkpoint files (find, save, load, prune), RNG state, the export copy."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import CocaError
from ..files import atomic_torch_save
from ..weights.checkpoint import TRAINING_CHECKPOINT as CHECKPOINT_FORMAT, load_torch_file

CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / CHECKPOINTS


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first (temp files ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def find_checkpoint(resume: str, output: str | Path) -> Optional[Path]:
    """``latest`` (None when the run has none yet), a run folder or a checkpoint file."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir(output))
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / CHECKPOINTS)
        if not found:
            raise CocaError(f"no checkpoints in {path}")
        return found[-1][1]
    if not path.is_file():
        raise CocaError(f"checkpoint not found: {resume}")
    return path


def save_checkpoint(path: Path, state: dict) -> None:
    """Written to a temporary file and renamed: a crash or a full disk never leaves a half-written
    checkpoint (a failed write is one line naming the file and the OS reason)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: Path) -> dict:
    try:
        state = load_torch_file(path)
    except CocaError as err:  # unreadable or refused, already one line
        older = _older_readable_checkpoint(path)
        instead = f"; the next-older good checkpoint is {older}: continue from it with --resume {older}"
        raise CocaError(f"{err}{instead if older else ''}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CocaError(f"{path} is not a coca training checkpoint")
    return state


def _older_readable_checkpoint(damaged: Path) -> Optional[Path]:
    """The newest checkpoint older than ``damaged`` in its folder that still reads: where to go on
    from when the newest is truncated (a full disk, a copy cut short). Nothing is deleted: the
    choice is the user's."""
    name = _CHECKPOINT_NAME.match(damaged.name)
    if name is None:
        return None
    older = [path for step, path in list_checkpoints(damaged.parent) if step < int(name.group(1))]
    return next((path for path in reversed(older) if _readable(path)), None)


def _readable(path: Path) -> bool:
    """Whether ``path`` loads as a training checkpoint; memory-mapped, so tensors are not read."""
    try:
        state = load_torch_file(path, mmap=True)
    except CocaError:
        return False
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def prune_checkpoints(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


class _StateOnly:
    """Stands in for the model in ``save_native``, which reads only its state dict."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def float_copy(model: nn.Module):
    """The export is float32 whatever the training precision."""
    if all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()):
        return model
    return _StateOnly({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
