"""Shared fixtures: open_clip reference models with random weights, converted with `coca convert`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
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


# -- a tiny CoCa trained on scikit-learn's digits (see test_learning.py), once a session ----------

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT_DIGITS = 300

DIGITS_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 32, "patch_size": 32,
                   "attentional_pool": True, "attn_pooler_queries": 16, "attn_pooler_heads": 4,
                   "output_tokens": True},
    "text_cfg": {"context_length": 5, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 5, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
    "custom_text": True,
}

DIGITS_TRAIN = ["--batch-size", "32", "--epochs", "8", "--lr", "1e-3", "--warmup", "10", "--wd", "0.1",
                "--coca-caption-loss-weight", "1", "--coca-contrastive-loss-weight", "1", "--precision", "fp32",
                "--workers", "0", "--seed", "0", "--keep", "1", "--log-every-n-steps", "50"]


@dataclass
class TrainedDigits:
    root: Path  # train/ and test/ images, train.csv and test.csv (filepath,title "the digit seven")
    truth: dict  # each held-out image's path -> its digit's word
    run: Path  # the `coca train` run folder; run / "final" is the model for --pretrained
    seconds: float  # how long training took


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory) -> TrainedDigits:
    """The 1797 8x8 digits upscaled to 64x64 RGB, 300 held out, and a tiny CoCa trained on the rest
    through `coca train` (about a minute on two cores)."""
    import json
    import time

    import numpy as np
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.RandomState(0).permutation(len(data.target))
    held_out = set(order[:HELD_OUT_DIGITS].tolist())
    rows = {"train": ["filepath,title"], "test": ["filepath,title"]}
    truth = {}
    for i, (pixels, target) in enumerate(zip(data.images, data.target)):
        image = Image.fromarray((pixels / 16 * 255).astype(np.uint8), "L").resize((64, 64), Image.BICUBIC)
        split = "test" if i in held_out else "train"
        path = root / split / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        image.convert("RGB").save(path)
        rows[split].append(f"{path},the digit {DIGIT_WORDS[target]}")
        if split == "test":
            truth[str(path)] = DIGIT_WORDS[target]
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    (root / "coca_digits.json").write_text(json.dumps(DIGITS_CONFIG))
    start = time.perf_counter()
    assert run_cli("train", "--model", root / "coca_digits.json", "--data", root / "train.csv", "--output",
                   root / "run", "--val-data", root / "test.csv", "--val-num-samples", "100", *DIGITS_TRAIN) == 0
    return TrainedDigits(root, truth, root / "run", time.perf_counter() - start)


# -- commands stopped at a precise point, for signal tests that do not depend on timing -----------

# `coca ARGS` that pauses at a precise point: after the first AFTER batches of images were handed out
# (all their results written), or, with ``at="train_step"``, before training step AFTER + 1 (step
# AFTER logged). There it writes to the READY pipe and waits on the HOLD pipe: a signal lands there
# and nowhere else.
COCA_PAUSING = """
import os, signal, sys
from coca_cli.tasks import captioning, embeddings
from coca_cli.train import loop as train
from coca_cli.cli import main

ready, hold, after, at = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# Ctrl-C as in a terminal's foreground, even when the suite itself runs with SIGINT ignored
# (a background job of a non-interactive shell, nohup), which the command would inherit.
signal.signal(signal.SIGINT, signal.default_int_handler)

def pause():
    os.write(ready, b"paused")
    os.read(hold, 1)  # returns when the test closes its end, after signalling

def pausing(iter_batches):
    def batches(*args, **kwargs):
        for done, batch in enumerate(iter_batches(*args, **kwargs), 1):
            yield batch
            if done == after:
                pause()
    return batches

def pausing_step(train_step):
    def step(self, micro, stop):
        if self.step == after:
            pause()
        return train_step(self, micro, stop)
    return step

if at == "train_step":
    train.Trainer.train_step = pausing_step(train.Trainer.train_step)
else:
    captioning.iter_batches = pausing(captioning.iter_batches)
    embeddings.iter_batches = pausing(embeddings.iter_batches)
sys.exit(main(sys.argv[5:]))
"""


class Paused:
    """A `coca` subprocess stopped after ``after`` batches (or training steps, ``at="train_step"``);
    ``stop(sig)`` signals it and waits for its end.

    ``group``: the signal goes to the command's whole process group, as a terminal's Ctrl-C (or a
    service manager's stop) would, so image-decoding workers receive it too.
    """

    def __init__(self, after: int, *args, group: bool = False, at: str = "batches"):
        ready_reader, ready = os.pipe()
        hold, self.hold = os.pipe()
        self.group = group
        self.proc = subprocess.Popen([sys.executable, "-c", COCA_PAUSING, str(ready), str(hold), str(after), at,
                                      *map(str, args)], pass_fds=(ready, hold), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=subprocess_env(), start_new_session=group)
        os.close(ready)
        os.close(hold)
        with os.fdopen(ready_reader, "rb") as reader:
            reached = reader.read(len(b"paused"))  # empty if the command ended without pausing
        if reached != b"paused":
            os.close(self.hold)
            raise AssertionError(f"the command did not reach the pause: {self.proc.communicate()}")

    def written(self) -> list[str]:
        """The lines on stdout so far: only what the command has flushed can be there."""
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        try:
            return (os.read(fd, 1 << 20) or b"").decode().splitlines()
        except BlockingIOError:
            return []
        finally:
            os.set_blocking(fd, True)

    def stop(self, sig) -> tuple[str, str]:
        try:
            (os.killpg if self.group else os.kill)(self.proc.pid, sig)
            os.close(self.hold)
            out, err = self.proc.communicate()
            return (out or b"").decode(), (err or b"").decode()
        finally:
            if self.group:  # the test fails below if anything was left; it is not left running
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def without_cxx_compiler():
    """Inductor finds no C++ compiler, through torch's own ``config.patch``: pytest's monkeypatch
    leaves torch's config without the setting once it undoes (seen for ``cpp.cxx`` and
    ``compile_threads``), and every later ``--compile`` in the session then fails."""
    import torch._inductor.config as inductor

    before = inductor.cpp.cxx
    with inductor.patch({"cpp.cxx": ("no-such-c++",)}):
        yield
    assert inductor.cpp.cxx == before
