"""Issue 13, class 9 (messages): a refused pickle never suggests loading it anyway; labels that
read the same are duplicates; a pipe or device given as an image is skipped with a reason."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import unicodedata
import warnings

import pytest
import torch

from conftest import PHOTOS, make_photo_dir, one_error_line, run_cli, subprocess_env

# -- pickles that weights_only=True refuses ------------------------------------------------------

# What torch's own refusal says and ours must not: load it anyway, allowlist its objects, trust it.
TORCH_ADVICE = ("weights_only", "weights only", "safe_globals", "trusted source", "if you trust", "\x1b[")


class RunsShell:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# Each writes a file as large as a real checkpoint of ``model`` (so that no size check stops it before
# it is unpickled) that holds more than tensors.

def _whole_model(path, model, marker):  # torch.save(model) instead of its state dict
    torch.save(model, path)


def _shell_in_state_dict(path, model, marker):  # a real checkpoint with one planted entry
    torch.save({"state_dict": {**model.state_dict(), "visual.proj": RunsShell(marker)}}, path)


def _optimizer(path, model, marker):
    torch.save(torch.optim.SGD(model.parameters(), lr=0.1), path)


def _plain_pickle(path, model, marker):  # pickle.dump, not torch.save's zip: the legacy reader
    with open(path, "wb") as f:
        pickle.dump({"logit_scale": RunsShell(marker), **model.state_dict()}, f, protocol=2)


def _torchscript(path, model, marker):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; its archives are still met
        width = int(sum(p.numel() for p in model.parameters()) ** 0.5)
        torch.jit.script(torch.nn.Linear(width, width)).save(str(path))


PICKLES = [_whole_model, _shell_in_state_dict, _optimizer, _plain_pickle, _torchscript]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("make", PICKLES, ids=lambda make: make.__name__.strip("_"))
def test_a_refused_pickle_never_suggests_loading_it_anyway(make, tiny, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    make(evil, tiny[0], marker)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    latest = run / "checkpoints" / "step_000000004.pt"
    shutil.copy(evil, latest)
    shutil.copy(PHOTOS[0], tmp_path / "photo.jpg")
    (tmp_path / "pairs.csv").write_text("filepath,title\nphoto.jpg,a photo\nphoto.jpg,the photo\n")
    before = {path: _digest(path) for path in (evil, latest)}

    commands = {
        "caption --pretrained": ["caption", PHOTOS[0], "--pretrained", evil, "--model", "coca_tiny"],
        "convert": ["convert", evil, "--model", "coca_tiny", "--output", tmp_path / "converted"],
        "train --resume latest": ["train", "--model", "coca_tiny", "--data", tmp_path / "pairs.csv", "--workers", "0",
                                  "--precision", "fp32", "--batch-size", "2", "--epochs", "1", "--output", run,
                                  "--resume", "latest"],
        "retrieve --index": ["retrieve", "--images", PHOTOS[0], "--query", "a dog", "--pretrained", tiny[1],
                             "--index", evil],
    }
    for name, args in commands.items():
        assert run_cli(*args) == 2, name
        err = one_error_line(capsys)
        assert not any(advice in err.lower() for advice in TORCH_ADVICE), (name, err)
        if name != "retrieve --index":  # retrieve refuses any file that is not an index, without loading it
            assert "refusing to load" in err and "could run code" in err and ".safetensors" in err, (name, err)
    assert not marker.exists()
    assert {path: _digest(path) for path in (evil, latest)} == before
    assert not (tmp_path / "converted").exists()


# -- labels that read the same -------------------------------------------------------------------

CAFE, CAFE_DECOMPOSED = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")


@pytest.mark.parametrize("labels, named, distinct", [
    (["Dog", "dog", "DOG"], ["'Dog'", "'dog'", "'DOG'"], ["Dog", "dogs", "hot dog"]),
    (["bird", "cat", " Cat "], ["'cat'", "'Cat'"], ["bird", "cat", "cats"]),
    (["hot dog", "hot  Dog", "bun"], ["'hot dog'", "'hot  Dog'"], ["hot dog", "hotdog", "bun"]),
    ([CAFE, "tea", CAFE_DECOMPOSED], [ascii(CAFE), ascii(CAFE_DECOMPOSED)], [CAFE, "cafe", "tea"]),
])
def test_labels_differing_in_case_spacing_or_unicode_form_are_duplicates(labels, named, distinct, tiny, tmp_path,
                                                                         capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(labels) + "\n", encoding="utf-8")
    for given in (["--labels", ",".join(labels)], ["--labels-file", labels_file]):
        output = tmp_path / "out.jsonl"
        assert run_cli("classify", PHOTOS[0], *given, "--pretrained", tiny[1], "--output", output) == 2
        err = one_error_line(capsys)
        assert "duplicate label" in err and all(name in err for name in named), err
        assert not output.exists()

    folder = tmp_path / "val"
    for label in labels:
        (folder / label.strip().replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        shutil.copy(PHOTOS[0], folder / label.strip().replace(" ", "_") / "photo.jpg")
    assert run_cli("eval", "zeroshot", "--data", folder, "--pretrained", tiny[1]) == 2
    err = one_error_line(capsys)
    assert "duplicate label" in err and all(name in err for name in named), err

    # near misses that read differently are distinct classes
    assert run_cli("classify", PHOTOS[0], "--labels", ",".join(distinct), "--pretrained", tiny[1],
                   "--format", "jsonl") == 0
    assert capsys.readouterr().out.count('"label"') == len(distinct)


# -- pipes and devices given as images -----------------------------------------------------------

HANG_LIMIT_S = 300  # generous: only a command that hangs comes near it


def _coca(*args):
    """`coca ARGS` in its own process group, killed whole (image workers too) if it hangs."""
    proc = subprocess.Popen([sys.executable, "-m", "coca_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"coca {args[0]} hung on a pipe or device given as an image")
    return proc.returncode, out, err


@pytest.fixture
def odd_inputs(tmp_path):
    """(good photos, things that are not regular files): a FIFO and a socket with image names
    inside the folder, a FIFO given by name, and two endless devices."""
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(make_photo_dir(folder).iterdir())
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(tmp_path / "named-pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "socket.png"))
    odd = [folder / "pipe.jpg", folder / "socket.png", tmp_path / "named-pipe", "/dev/zero", "/dev/urandom"]
    return folder, good, odd


@pytest.mark.parametrize("command, extra", [
    ("caption", ["--workers", "0"]),
    ("caption", ["--workers", "2", "--batch-size", "2"]),
    ("classify", ["--labels", "dog,cat", "--format", "jsonl", "--workers", "2", "--batch-size", "2"]),
])
def test_pipes_and_devices_are_skipped_as_not_regular_files(command, extra, odd_inputs, tiny):
    folder, good, odd = odd_inputs
    rc, out, err = _coca(command, folder, *odd[2:], "--pretrained", tiny[1], *extra)
    assert rc == 1, err
    assert all(str(photo) in out for photo in good), out
    lines = err.splitlines()
    assert sorted(lines[:-1]) == sorted(f"skipped {path}: not a regular file" for path in odd), err
    assert lines[-1].startswith(f"coca: error: {len(odd)} of {len(good) + len(odd)} images could not be"), err
