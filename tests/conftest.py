"""Shared fixtures: open_clip reference models with random weights, converted with `coca convert`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the real hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def openclip_reference(name: str, seed: int = 0, std: float = 0.05):
    """An open_clip CoCa with every parameter re-drawn from a seeded normal.

    open_clip leaves some tensors uninitialised (``text_decoder.text_projection``) or at
    trivial values (zero biases, unit LayerNorm weights); random values everywhere make the
    parity checks cover every parameter.
    """
    import open_clip

    if name == "coca_tiny":
        open_clip.add_model_config(str(ROOT / "models" / "coca_tiny.json"))
    model = open_clip.create_model(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("logit_scale"):
                param.fill_(4.6)
            elif "ln_" in pname and pname.endswith("weight"):
                param.copy_(1 + std * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    return model.eval()


def run_cli(*args: str) -> int:
    from coca_cli.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """name -> (open_clip model, native folder written by `coca convert`), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ref = openclip_reference(name)
            folder = tmp_path_factory.mktemp(name)
            torch.save(ref.state_dict(), folder / "open_clip_pytorch_model.bin")
            assert run_cli("convert", folder / "open_clip_pytorch_model.bin", "--model", name,
                           "--output", folder / "native") == 0
            cache[name] = (ref, folder / "native")
        return cache[name]

    return get
