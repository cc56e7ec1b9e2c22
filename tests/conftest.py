"""Shared fixtures: open_clip reference models with random weights, converted with `coca convert`."""

from __future__ import annotations

import os
from pathlib import Path

import shutil

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = sorted((ROOT / "examples" / "images").glob("*.jpg"))
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


# -- the tiny model and photos shared by the command tests ---------------------------------------

def make_photo_dir(folder):
    """The example photos plus two from scikit-image (one grayscale), copied into ``folder``."""
    from skimage import data

    for path in PHOTOS:
        shutil.copy(path, folder / path.name)
    Image.fromarray(data.rocket()).save(folder / "rocket.png")
    Image.fromarray(data.camera()).save(folder / "camera.png")
    return folder


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    return make_photo_dir(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def tiny(converted):
    """(open_clip reference model, native folder for --pretrained), same random weights."""
    return converted("coca_tiny")


def reference_image_features(ref, paths) -> torch.Tensor:
    """open_clip's own preprocessing and encode_image."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**ref.visual.preprocess_cfg), is_train=False)
    with torch.no_grad():
        return ref.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)


def reference_text_features(ref, texts) -> torch.Tensor:
    import open_clip

    with torch.no_grad():
        return ref.encode_text(open_clip.get_tokenizer("coca_tiny")(list(texts)), normalize=True)


def reference_classifier(ref, classnames, templates) -> torch.Tensor:
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    return build_zero_shot_classifier(ref, open_clip.get_tokenizer("coca_tiny"), classnames, templates)


def reference_probs(ref, paths, classnames, templates) -> torch.Tensor:
    """open_clip's zero-shot probabilities, with the model's own temperature (as `classify`)."""
    with torch.no_grad():
        logits = ref.logit_scale.exp() * reference_image_features(ref, paths) @ reference_classifier(ref, classnames,
                                                                                                    templates)
    return logits.softmax(dim=-1)


def subprocess_env() -> dict:
    """The environment for running `python -m coca_cli` from a test: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("coca: error: ") and err.count("\n") == 1, err
    return err
