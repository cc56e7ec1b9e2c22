"""Which torch device a command runs on."""

from __future__ import annotations

from .errors import CocaError


def pick_device(device: str, *, mps: bool = True) -> str:
    """'auto' means the fastest present: CUDA, then Apple MPS (unless ``mps`` is False), then CPU.
    Asking for a device this machine lacks is a usage error here, not a driver error later."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    has_mps = backend is not None and backend.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps and mps else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise CocaError(f"unknown --device '{device}' (choose auto, cpu, cuda, cuda:N or mps)") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise CocaError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu or auto)")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise CocaError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind.type == "mps" and not has_mps:
        raise CocaError(f"--device {device}: Apple's MPS backend is not available on this machine "
                        "(use --device cpu or auto)")
    return device
