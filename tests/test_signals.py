"""Ctrl-C (SIGINT) and SIGTERM stop a command cleanly: exit 130 / 143, one last line saying so,
no traceback, and every result produced before the signal kept whole (and resumable).

Nothing here depends on timing: the command pauses at a precise point (after a given number of
batches have been handed out and their results written), says so through a pipe, and the signal
is sent only then, while it waits.
"""

import json
import os
import shutil
import signal

import pytest
from PIL import Image

from conftest import Paused, run_cli

FAST_CAPTION = ["--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]
CODES = {signal.SIGINT: (130, "coca: error: interrupted"), signal.SIGTERM: (143, "coca: error: terminated")}

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Image.new("RGB", (64, 64), (40 * i, (70 * i) % 256, (130 * i) % 256)).save(folder / f"{i}.png")
    return folder


def _assert_stopped_by(proc, sig, stderr: str):
    code, last_line = CODES[sig]
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == last_line, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_caption_with_workers_keeps_every_finished_line_and_resumes(sig, photos, tiny, tmp_path):
    out = tmp_path / "captions.jsonl"
    args = ["caption", photos, "--pretrained", tiny[1], *FAST_CAPTION, "--batch-size", "1", "--workers", "2",
            "--output", out]
    paused = Paused(3, *args, group=True)
    _, stderr = paused.stop(sig)
    _assert_stopped_by(paused.proc, sig, stderr)
    with pytest.raises(ProcessLookupError):  # no decoding worker outlived the command
        os.killpg(paused.proc.pid, 0)
    lines = out.read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == [str(photos / f"{i}.png") for i in range(3)]
    assert all(json.loads(line)["caption"] for line in lines)

    assert run_cli(*args, "--resume") == 0
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(images) == [str(photos / f"{i}.png") for i in range(6)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_classify_to_a_pipe_keeps_every_finished_line(sig, photos, tiny):
    paused = Paused(2, "classify", photos, "--labels", "red,green,blue", "--pretrained", tiny[1], "--json",
                    "--batch-size", "1")
    first = paused.written()  # results already in the pipe: flushed as they came, not buffered
    assert [json.loads(line)["image"] for line in first] == [str(photos / "0.png"), str(photos / "1.png")]
    rest, stderr = paused.stop(sig)
    _assert_stopped_by(paused.proc, sig, stderr)
    assert rest == "" and all(len(json.loads(line)["predictions"]) == 3 for line in first)


def test_an_interrupted_retrieve_keeps_the_embeddings_it_made(photos, tiny, tmp_path, monkeypatch, capsys):
    from coca_cli.tasks.retrieval import ImageIndex

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
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
