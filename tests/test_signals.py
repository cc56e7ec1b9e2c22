"""Ctrl-C (SIGINT) and SIGTERM stop a command cleanly: exit 130 / 143, one last line saying so,
no traceback, and every result produced before the signal kept whole (and resumable)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import run_cli, subprocess_env

FAST_CAPTION = ["--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]
CODES = {signal.SIGINT: (130, "coca: error: interrupted"), signal.SIGTERM: (143, "coca: error: terminated")}


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """400 small images: enough that no run finishes before the signal arrives."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(400):
        Image.new("RGB", (64, 64), (i % 256, (7 * i) % 256, (13 * i) % 256)).save(folder / f"{i:03d}.png")
    return folder


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "coca_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())


def _wait_for(condition, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "no result appeared"
        time.sleep(0.05)


def _assert_stopped_by(proc, sig, stderr: str):
    code, last_line = CODES[sig]
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == last_line, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_caption_to_a_file_keeps_every_finished_line_and_resumes(sig, many_photos, tiny, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = ["caption", many_photos, "--pretrained", tiny[1], *FAST_CAPTION, "--batch-size", "1", "--output", out]
    proc = _start(*args)
    _wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    _assert_stopped_by(proc, sig, stderr)
    lines = out.read_text().splitlines()
    assert 3 <= len(lines) < 400
    assert all(json.loads(line)["caption"] for line in lines)  # whole lines only

    assert run_cli(*args, "--resume") == 0
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert len(images) == len(set(images)) == 400


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_classify_to_a_pipe_keeps_every_finished_line(sig, many_photos, tiny):
    proc = _start("classify", many_photos, "--labels", "red,green,blue", "--pretrained", tiny[1], "--json",
                  "--batch-size", "1")
    first = proc.stdout.readline()  # a result reached the pipe: it was flushed, not buffered
    assert json.loads(first)["predictions"]
    proc.send_signal(sig)
    rest, stderr = proc.communicate(timeout=60)
    _assert_stopped_by(proc, sig, stderr)
    lines = [first.rstrip("\n"), *rest.splitlines()]
    assert len(lines) < 400 and all(len(json.loads(line)["predictions"]) == 3 for line in lines)


def test_an_interrupted_retrieve_keeps_the_embeddings_it_made(many_photos, tiny, tmp_path, monkeypatch, capsys):
    from coca_cli.retrieval import ImageIndex

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted(many_photos.iterdir())[:6]:
        shutil.copy(path, folder / path.name)
    add = ImageIndex.add
    calls = []

    def add_then_interrupt(self, batch):
        add(self, batch)
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two of three batches

    monkeypatch.setattr(ImageIndex, "add", add_then_interrupt)
    args = ["retrieve", "--images", folder, "--query", "red", "--pretrained", tiny[1], "--batch-size", "2"]
    assert run_cli(*args) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "coca: error: interrupted"
    monkeypatch.setattr(ImageIndex, "add", add)
    assert run_cli(*args) == 0
    assert "embedded 2 new images, reused 4" in capsys.readouterr().err
