"""Data workers that fail: the sample they failed on is named, and what was done before is kept."""

import functools
import os
import signal

import pytest
import torch
from PIL import Image

from coca_cli.data import DataConfig, TrainData
from coca_cli.errors import CocaError
from coca_cli.images import iter_batches
from coca_cli.tokenizer import tokenize

POISON = (13, 13)  # the image size the transforms below choke on


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(8):
        path = folder / f"{i}.png"
        Image.new("RGB", POISON if i == 5 else (20, 20), (30 * i, 0, 0)).save(path)
        paths.append(path)
    return paths


def kill_on_poison(image):
    """Dies as a decoder crash or the out-of-memory killer would: no exception, no cleanup."""
    if image.size == POISON:
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.zeros(3, 8, 8)


def raise_on_poison(image):
    if image.size == POISON:
        raise RuntimeError("the transform broke")
    return torch.zeros(3, 8, 8)


def test_a_dead_image_worker_is_reported_with_its_file(images):
    done = []
    with pytest.raises(CocaError) as info:
        for batch in iter_batches(images, kill_on_poison, batch_size=2, workers=1):
            done += batch.paths
    assert done == images[:len(done)] and len(done) <= 4  # in order, up to the crash (prefetch may lose some)
    assert f"died while reading {images[5]}" in str(info.value) and info.value.exit_code == 1


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
    from coca_cli.recaption import caption_shard

    shard = _shard(tmp_path, images)
    with pytest.raises(CocaError, match=f"failed on sample s005 of {shard}: RuntimeError"):
        caption_shard(torch.nn.Linear(1, 1), raise_on_poison, str(shard), tmp_path / "out", batch_size=100)
