"""Data workers that fail: the sample they failed on is named, and what was done before is kept.

A worker is only ever killed inside a `coca` subprocess: whatever the code under test does with a
dead worker (torch's DataLoader raises from a SIGCHLD handler at an arbitrary moment), it cannot
reach pytest's own process.
"""

import functools
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from coca_cli.data.datasets import DataConfig, TrainData
from coca_cli.errors import CocaError
from coca_cli.data.images import iter_batches
from coca_cli.data.tokenizer import tokenize

POISON = (13, 13)  # the image size the transforms below choke on

# `coca ARGS` in which decoding a POISON-sized image kills the process doing it, with no exception
# and no cleanup, as a decoder crash or the out-of-memory killer would.
COCA_KILLING_ON_POISON = f"""
import os, signal, sys
from coca_cli.data import images
from coca_cli.cli import main

load_image = images.load_image

def load_or_die(path):
    image = load_image(path)
    if image.size == {POISON}:
        os.kill(os.getpid(), signal.SIGKILL)
    return image

images.load_image = load_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(8):
        path = folder / f"{i}.png"
        Image.new("RGB", POISON if i == 5 else (20, 20), (30 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


def raise_on_poison(image):
    if image.size == POISON:
        raise RuntimeError("the transform broke")
    return torch.zeros(3, 8, 8)


def test_a_dead_image_worker_is_reported_with_its_file_and_earlier_captions_kept(images, tiny, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = subprocess.run([sys.executable, "-c", COCA_KILLING_ON_POISON, "caption", images[0].parent,
                             "--pretrained", str(tiny[1]), "--workers", "1", "--batch-size", "2", "--seq-len", "6",
                             "--output", str(out)], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1] == (f"coca: error: a worker decoding images died while reading {images[5]} "
                                              "(killed by signal SIGKILL); results so far are kept")
    # the two batches before the poisoned one, in order: the worker's earlier results were not lost
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == list(map(str, images[:4]))


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_on_one_image_fails_that_image_only(images, workers):
    batches = list(iter_batches(images, raise_on_poison, batch_size=3, workers=workers))
    assert [p for b in batches for p in b.paths] == images[:5] + images[6:]
    assert [f for b in batches for f in b.failures] == [(images[5], "failed: RuntimeError: the transform broke")]


def test_a_training_worker_error_names_the_csv_row_image(images, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,title\n" + "".join(f"{p},a red square\n" for p in images))
    cfg = DataConfig(str(table), workers=1, batch_size=8)
    data = TrainData(cfg, raise_on_poison, functools.partial(tokenize, context_length=8))
    with pytest.raises(CocaError, match=f"failed on {images[5]}: RuntimeError: the transform broke"):
        list(data.epoch(0))


def _shard(folder, images):
    import webdataset as wds

    shard = folder / "train-0000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, path in enumerate(images):
            sink.write({"__key__": f"s{i:03d}", "png": path.read_bytes(), "txt": "a red square"})
    return shard


def test_a_training_worker_error_names_the_shard_sample(images, tmp_path):
    shard = _shard(tmp_path, images)
    cfg = DataConfig(str(shard), workers=1, batch_size=8, num_samples=8, shuffle_buffer=1)
    data = TrainData(cfg, raise_on_poison, functools.partial(tokenize, context_length=8))
    with pytest.raises(CocaError, match=f"failed on sample s005 of {shard}: RuntimeError: the transform broke"):
        list(data.epoch(0))


def test_a_shard_recaption_error_names_the_sample(images, tmp_path):
    from coca_cli.tasks.recaption import caption_shard

    shard = _shard(tmp_path, images)
    with pytest.raises(CocaError, match=f"failed on sample s005 of {shard}: RuntimeError"):
        caption_shard(torch.nn.Linear(1, 1), raise_on_poison, str(shard), tmp_path / "out", batch_size=100)
