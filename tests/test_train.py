"""`coca train` / `coca finetune`: data inputs, checkpoints (atomic, pruned, resumed exactly after
SIGKILL, written on SIGTERM), accumulation, non-finite losses, one-line errors, the final export."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli, subprocess_env

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FAST = ["--model", "coca_tiny", "--workers", "0", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
        "--log-every-n-steps", "1"]


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_image(index: int) -> Image.Image:
    pixels = (_digits().images[index] / 16 * 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").resize((64, 64), Image.BICUBIC).convert("RGB")


def caption(index: int) -> str:
    word = WORDS[_digits().target[index]]
    return [f"the digit {word}", f"a handwritten {word} in black and white", word][index % 3]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A CSV of 48 digit images with captions of different lengths."""
    root = tmp_path_factory.mktemp("pairs")
    rows = ["filepath,title"]
    for i in range(48):
        digit_image(i).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{caption(i)}")  # paths relative to the table
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


def weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst}"


# -- help and usage errors --------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "finetune"])
def test_help_shows_an_example(command, capsys):
    assert run_cli(command, "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"coca {command}" in out


def test_finetune_help_shows_the_caption_recipe_defaults(capsys):
    assert run_cli("finetune", "--help") == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--lr <float> Peak learning rate. [default: 1e-05]", "[default: 1000; x>=0]", "[default: 0.1]",
                 "Weight of the contrastive loss (0 skips it). [default: 0.0]"):
        assert text in out


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.csv"], "data file not found: missing.csv"),
    (["--data", "missing.csv", "--gpus", "2"], "data file not found: missing.csv"),  # before any relaunch
    (["--data", "{pairs}", "--csv-img-key", "path", "--gpus", "2"], "has no column 'path'"),
    (["--data", "{pairs}", "--csv-caption-key", "caption"], "has no column 'caption'"),
    (["--data", "{pairs}", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["--data", "{empty}"], "has no rows"),
    (["--data", "{pairs}", "--batch-size", "64"], "fewer than one global batch"),
    (["--data", "{shards}"], "pass --train-num-samples"),
    (["--data", "{pairs}", "--report-to", "tensorboard"], "--report-to tensorboard needs the tensorboard package"),
    (["--data", "{pairs}", "--report-to", "wandb"], "--report-to wandb needs the wandb package"),
])
def test_bad_input_is_one_line(args, message, pairs, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")
    values = {"pairs": pairs, "empty": tmp_path / "empty.csv", "shards": tmp_path / "shards"}
    args = [a.format(**values) for a in args]
    assert run_cli("train", *FAST, *args, "--output", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coca: error: ") and message in err, err


def test_launcher_detection_and_torchrun_command(monkeypatch):
    from coca_cli.distributed import launched, torchrun_command

    assert not launched({})
    assert launched({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert launched({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"})
    assert not launched({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # one task may start torchrun itself
    cmd = torchrun_command(["train", "--data", "x.csv"], 4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone",
                       "-m", "coca_cli", "train", "--data", "x.csv"]
    cmd = torchrun_command(["train"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234)
    assert cmd[5:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "1234"]


def test_finetune_needs_pretrained(pairs, tmp_path, capsys):
    assert run_cli("finetune", "--data", pairs, "--output", tmp_path) == 2
    assert "coca finetune needs --pretrained" in capsys.readouterr().err


# -- data -----------------------------------------------------------------------------------------

def test_brace_patterns_and_global_batches():
    from coca_cli.data import GlobalBatches, expand_braces

    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == [f"{d}/x-{i}.tar" for d in "ab" for i in (8, 9, 10)]
    one = list(GlobalBatches(40, 40, 8, 0, 1, 1, seed=3, epoch=1, start_step=0))
    two = [list(GlobalBatches(40, 40, 4, r, 2, 1, seed=3, epoch=1, start_step=0)) for r in range(2)]
    assert len(one) == len(two[0]) == 5
    for step in range(5):  # rank 0 and rank 1 together read exactly the single process's batch
        assert two[0][step] + two[1][step] == one[step]
    resumed = list(GlobalBatches(40, 40, 8, 0, 1, 1, seed=3, epoch=1, start_step=2))
    assert resumed == one[2:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three webdataset shards of digit pairs (png/jpg, txt/json captions), one sample without a
    caption, one with a corrupt image."""
    import io

    import webdataset as wds

    root = tmp_path_factory.mktemp("shards")
    index = 0
    for shard in range(3):
        with wds.TarWriter(str(root / f"train-{shard:04d}.tar")) as sink:
            for _ in range(12):
                buf = io.BytesIO()
                fmt = "png" if index % 2 else "jpg"
                digit_image(index).save(buf, format="PNG" if fmt == "png" else "JPEG")
                sample = {"__key__": f"s{index:05d}", fmt: buf.getvalue()}
                if index % 4 == 3:
                    sample["json"] = json.dumps({"caption": caption(index)}).encode()
                else:
                    sample["txt"] = caption(index)
                if index == 5:
                    del sample["txt"]  # no caption
                if index == 17:
                    sample[fmt] = b"\x89PNG\r\n\x1a\n not really an image"
                sink.write(sample)
                index += 1
    return root


def test_webdataset_shards_skip_and_count_broken_samples(shards, tmp_path, capsys):
    run = tmp_path / "run"
    pattern = str(shards / "train-{0000..0002}.tar")
    assert run_cli("train", *FAST, "--data", pattern, "--train-num-samples", "32", "--batch-size", "4",
                   "--epochs", "2", "--workers", "2", "--output", run, "--shuffle-buffer", "8") == 0
    err = capsys.readouterr().err
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    # each epoch reads 32+ of the 36 samples (2 worker streams over 3 shards), two of them broken
    match = re.search(r"skipped samples: (\d+) no caption, (\d+) unreadable image\n", err)
    assert match, err
    assert int(match[1]) >= 1 and int(match[2]) >= 1
    assert rows[-1]["skipped"] == int(match[1]) + int(match[2])
    assert all(np.isfinite(r["contrastive_loss"]) and np.isfinite(r["caption_loss"]) for r in rows)
    assert all(0 <= r["data_wait"] <= 1 for r in rows)  # share of the time spent waiting for batches


def test_resampled_shards_and_shard_validation(shards, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", f"{shards}/train-0000.tar::{shards}/train-0001.tar",
                   "--dataset-resampled", "--train-num-samples", "24", "--batch-size", "4", "--epochs", "1",
                   "--workers", "2", "--val-data", shards / "train-0002.tar", "--output", run) == 0
    rows = metrics(run)
    assert [r["step"] for r in rows if "split" not in r] == list(range(1, 7))
    [val] = [r for r in rows if r.get("split") == "val"]
    assert val["val_samples"] == 12 and 0 <= val["image_to_text_R@1"] <= val["image_to_text_R@5"] <= 1


def test_webdataset_resume_after_a_crash_is_exact(shards, tmp_path, monkeypatch):
    """Two loader workers, a shuffle buffer and broken samples: the data position in the
    checkpoint replays each worker's stream exactly."""
    from coca_cli import train as train_module

    args = [*FAST, "--data", str(shards), "--train-num-samples", "32", "--batch-size", "4", "--epochs", "2",
            "--workers", "2", "--shuffle-buffer", "8", "--save-every-n-steps", "3"]
    assert run_cli("train", *args, "--output", tmp_path / "whole") == 0

    original = train_module.Trainer.train_step

    def crash_after_step_5(self, micro, stop):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self, micro, stop)

    monkeypatch.setattr(train_module.Trainer, "train_step", crash_after_step_5)
    assert run_cli("train", *args, "--output", tmp_path / "crashed") == 130
    assert checkpoints(tmp_path / "crashed") == ["step_000000003.pt"]
    monkeypatch.setattr(train_module.Trainer, "train_step", original)
    assert run_cli("train", *args, "--output", tmp_path / "crashed", "--resume", "latest") == 0
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "crashed"))
    losses = [(r["step"], r["caption_loss"]) for r in metrics(tmp_path / "crashed")]
    assert losses == [(r["step"], r["caption_loss"]) for r in metrics(tmp_path / "whole")]


# -- checkpoints ----------------------------------------------------------------------------------

def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    from coca_cli import train as train_module
    from coca_cli.errors import CocaError

    folder = tmp_path / "checkpoints"
    good = {"format": train_module.CHECKPOINT_FORMAT, "step": 1, "w": torch.arange(4.0)}
    train_module.save_checkpoint(folder / "step_000000001.pt", good)
    real_save = torch.save

    def dies_half_way(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(CocaError, match="No space left on device"):
        train_module.save_checkpoint(folder / "step_000000002.pt", {**good, "step": 2})
    with pytest.raises(CocaError):  # overwriting in place fails the same way
        train_module.save_checkpoint(folder / "step_000000001.pt", {**good, "step": 3})
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000001.pt"]  # no temp file, no half file
    loaded = train_module.load_checkpoint(folder / "step_000000001.pt")
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert train_module.find_checkpoint("latest", tmp_path) == folder / "step_000000001.pt"


def test_keep_prunes_old_checkpoints_and_export_captions(pairs, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "2",
                   "--save-every-n-steps", "2", "--keep", "2", "--output", run) == 0
    # steps 2, 4 (in epoch 0), 6 (end of epoch 0), 8, 10, 12 (end of epoch 1): the last two remain
    assert checkpoints(run) == ["step_000000010.pt", "step_000000012.pt"]
    assert sorted(p.name for p in (run / "final").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((run / "train_config.json").read_text())["keep"] == 2
    capsys.readouterr()
    image = pairs.parent / "000.png"
    assert run_cli("caption", image, "--pretrained", run / "final", "--seq-len", "8", "--min-seq-len", "2",
                   "--num-beams", "2", "--num-beam-groups", "1") == 0
    path, text = capsys.readouterr().out.strip().split("\t")
    assert path == str(image) and text
    # a finished run refuses to start over in the same folder, but can be resumed (nothing left to do)
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "2", "--output", run) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "2", "--output", run,
                   "--resume", "latest") == 0


def test_accumulation_equals_a_larger_batch(pairs, tmp_path):
    # lr 1e-4: Adam divides each gradient by its own magnitude, so components that are ~0 up to
    # float rounding (summed in another order here) move by up to ~lr/10 in either run
    common = [*FAST, "--data", pairs, "--epochs", "1", "--train-num-samples", "32", "--lr", "1e-4"]
    assert run_cli("train", *common, "--batch-size", "8", "--output", tmp_path / "big") == 0
    assert run_cli("train", *common, "--batch-size", "4", "--accum-freq", "2", "--output", tmp_path / "acc") == 0
    assert_same_weights(weights(tmp_path / "big"), weights(tmp_path / "acc"), atol=1e-5)
    for a, b in zip(metrics(tmp_path / "big"), metrics(tmp_path / "acc")):
        assert a["step"] == b["step"]
        assert a["contrastive_loss"] == pytest.approx(b["contrastive_loss"], rel=1e-5)
        assert a["caption_loss"] == pytest.approx(b["caption_loss"], rel=1e-5)


def test_finetune_uses_the_caption_recipe(pairs, tmp_path, converted):
    _, tiny = converted("coca_tiny")
    run = tmp_path / "ft"
    assert run_cli("finetune", "--pretrained", tiny, "--data", pairs, "--batch-size", "8", "--workers", "0",
                   "--train-num-samples", "16", "--precision", "fp32", "--output", run) == 0
    cfg = json.loads((run / "train_config.json").read_text())
    assert (cfg["lr"], cfg["warmup"], cfg["wd"], cfg["epochs"]) == (1e-5, 1000, 0.1, 1)
    assert (cfg["coca_contrastive_loss_weight"], cfg["coca_caption_loss_weight"]) == (0.0, 1.0)
    rows = metrics(run)
    assert all(r["contrastive_loss"] == 0 for r in rows) and rows[-1]["caption_loss"] > 0
    start, end = load_file(str(tiny / "model.safetensors")), weights(run)
    assert torch.equal(start["logit_scale"], end["logit_scale"])  # untouched without the contrastive loss
    assert not torch.equal(start["text_decoder.text_projection"], end["text_decoder.text_projection"])


def test_nonfinite_loss_stops_keeping_the_last_good_checkpoint(pairs, tmp_path, capsys):
    explode = [*FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--lr", "1e30", "--warmup", "0",
               "--save-every-n-steps", "1"]
    run = tmp_path / "run"
    assert run_cli("train", *explode, "--output", run) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "step_000000001.pt" in err and "--skip-nonfinite" in err
    from coca_cli.train import load_checkpoint

    assert checkpoints(run) == ["step_000000001.pt"]
    assert load_checkpoint(run / "checkpoints" / "step_000000001.pt")["step"] == 1
    skip = tmp_path / "skip"
    assert run_cli("train", *explode, "--output", skip, "--skip-nonfinite") == 0
    err = capsys.readouterr().err
    assert err.count("non-finite loss (weights not updated)") == 5 and "done: 6 steps (5 skipped" in err
    assert [r["step"] for r in metrics(skip)] == [1]


# -- signals: subprocesses, as a real preemption or crash would be --------------------------------------

def _start(args: list, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coca_cli", "train", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "training ended before the test could interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_saves_a_checkpoint_and_exits(pairs, tmp_path):
    run = tmp_path / "run"
    proc = _start([*FAST, "--data", pairs, "--batch-size", "4", "--epochs", "50", "--output", run],
                  tmp_path / "log")
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    log = (tmp_path / "log").read_text()
    assert "stopped by SIGTERM" in log and "--resume latest" in log
    [name] = checkpoints(run)
    from coca_cli.train import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / name)
    assert state["step"] >= 2 and name == f"step_{state['step']:09d}.pt"


def test_sigkill_then_resume_latest_gives_the_same_weights(pairs, tmp_path):
    args = [*FAST, "--data", pairs, "--batch-size", "4", "--epochs", "2", "--save-every-n-steps", "3",
            "--workers", "1"]
    assert run_cli("train", *args, "--output", tmp_path / "whole") == 0
    run = tmp_path / "killed"
    proc = _start([*args, "--output", run], tmp_path / "log")
    # kill it between checkpoints, well before the end (24 steps)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(metrics(run)) >= 7, proc)
    proc.kill()
    proc.wait()
    done = metrics(run)[-1]["step"]
    assert 7 <= done < 24 and not (run / "final").exists()
    assert run_cli("train", *args, "--output", run, "--resume", "latest") == 0
    assert_same_weights(weights(tmp_path / "whole"), weights(run), atol=0)
    assert [r["step"] for r in metrics(run)] == list(range(1, 25))  # lines after the checkpoint replaced
