"""`coca train` / `coca finetune`: data inputs, checkpoints (atomic, pruned, resumed exactly after
SIGKILL, written on SIGTERM), accumulation, non-finite losses, one-line errors, the final export."""

import functools
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import Paused, one_error_line, run_cli

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FAST = ["--model", "coca_tiny", "--workers", "0", "--precision", "fp32", "--lr", "1e-3", "--warmup", "1",
        "--log-every-n-steps", "1"]


def fast_without(option: str) -> list[str]:
    """FAST leaving ``option`` at its default."""
    at = FAST.index(option)
    return FAST[:at] + FAST[at + 2:]


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
    from coca_cli.train.distributed import launched, torchrun_command

    assert not launched({})
    assert launched({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert launched({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"})
    assert not launched({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # one task may start torchrun itself
    cmd = torchrun_command(["train", "--data", "x.csv"], 4)
    assert cmd[1:] == ["-m", "coca_cli.train.torchrun", "--nproc_per_node", "4", "--standalone",
                       "-m", "coca_cli", "train", "--data", "x.csv"]
    cmd = torchrun_command(["train"], 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234)
    assert cmd[5:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "1234"]


def test_finetune_needs_pretrained(pairs, tmp_path, capsys):
    assert run_cli("finetune", "--data", pairs, "--output", tmp_path) == 2
    assert "coca finetune needs --pretrained" in capsys.readouterr().err


@pytest.mark.parametrize("device, error", [
    ("cuda", "--device cuda: no CUDA GPU is available on this machine (use --device cpu or auto)"),
    ("foo", "unknown --device 'foo' (choose auto, cpu, cuda, cuda:N or mps)")])
def test_train_on_a_device_this_machine_lacks_is_a_usage_error(pairs, tmp_path, monkeypatch, capsys, device, error):
    """One process trains where the commands run (before, --device foo ended in 'unexpected RuntimeError')."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("train", *FAST, "--data", pairs, "--device", device, "--output", tmp_path / "run") == 2
    assert one_error_line(capsys) == f"coca: error: {error}\n"


# -- data -----------------------------------------------------------------------------------------

def test_brace_patterns_and_global_batches():
    from coca_cli.data.datasets import GlobalBatches
    from coca_cli.data.shards import expand_braces

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
    from coca_cli.train import loop as train_module

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
    from coca_cli.train import checkpoints as train_module
    from coca_cli.errors import CocaError

    folder = tmp_path / "checkpoints"
    good = {"format": train_module.CHECKPOINT_FORMAT, "step": 1, "w": torch.arange(4.0)}
    train_module.save_checkpoint(folder / "step_000000001.pt", good)
    real_save = torch.save

    def dies_half_way(obj, file):  # checkpoints are saved through an open file
        real_save(obj, file)
        file.truncate(file.tell() // 2)
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
    # the parameters no loss reaches are frozen, but the optimizer holds every parameter, as it did
    # before they were: checkpoints saved then still resume
    from coca_cli import create_model

    checkpoint = torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)
    held = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
    assert held == len(list(create_model("coca_tiny").parameters()))
    assert run_cli("finetune", "--pretrained", tiny, "--data", pairs, "--batch-size", "8", "--workers", "0",
                   "--train-num-samples", "16", "--precision", "fp32", "--output", run, "--epochs", "2",
                   "--resume", "latest") == 0
    assert [r["step"] for r in metrics(run) if "caption_loss" in r] == [2, 4]


def test_finetune_and_preflight_take_model_names_that_bring_their_weights(pairs, tmp_path, capsys):
    """``--model local-dir:PATH`` (or ``hf-hub:org/repo``) is the weights to start from, as in open_clip:
    finetune asks for no --pretrained and starts from the folder's weights; the multi-process
    preflight checks such names (and --pretrained) once, before any process starts."""
    from coca_cli.errors import CocaError
    from coca_cli.train.config import TrainConfig, preflight
    from conftest import ROOT, openclip_reference

    folder = tmp_path / "weights"
    folder.mkdir()
    start = openclip_reference("coca_tiny", seed=7).state_dict()  # logit_scale 4.6, not the 2.66 of a new model
    torch.save(start, folder / "open_clip_pytorch_model.bin")
    config = json.loads((ROOT / "models" / "coca_tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    run = tmp_path / "ft"
    assert run_cli("finetune", "--model", f"local-dir:{folder}", "--data", pairs, "--batch-size", "8", "--workers", "0",
                   "--train-num-samples", "16", "--precision", "fp32", "--output", run) == 0
    assert torch.equal(weights(run)["logit_scale"], start["logit_scale"])  # no contrastive loss: as it started
    assert not torch.equal(weights(run)["text_decoder.text_projection"], start["text_decoder.text_projection"])
    capsys.readouterr()
    assert run_cli("finetune", "--model", "coca_tiny", "--data", pairs, "--output", tmp_path / "none") == 2
    assert "coca finetune needs --pretrained" in capsys.readouterr().err

    preflight(TrainConfig(data=str(pairs), model=f"local-dir:{folder}"))
    for model, pretrained, error in ((f"local-dir:{tmp_path / 'missing'}", None, "missing': no such folder"),
                                     ("local-dir:", None, "names no folder"),
                                     ("coca_tiny", str(tmp_path / "missing.pt"), "missing.pt")):
        with pytest.raises(CocaError, match=error):
            preflight(TrainConfig(data=str(pairs), model=model, pretrained=pretrained))


def test_nonfinite_loss_stops_keeping_the_last_good_checkpoint(pairs, tmp_path, capsys):
    explode = [*FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--lr", "1e30", "--warmup", "0",
               "--save-every-n-steps", "1"]
    run = tmp_path / "run"
    assert run_cli("train", *explode, "--output", run) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "step_000000001.pt" in err and "--skip-nonfinite" in err
    from coca_cli.train.checkpoints import load_checkpoint

    assert checkpoints(run) == ["step_000000001.pt"]
    assert load_checkpoint(run / "checkpoints" / "step_000000001.pt")["step"] == 1
    skip = tmp_path / "skip"
    assert run_cli("train", *explode, "--output", skip, "--skip-nonfinite") == 0
    err = capsys.readouterr().err
    assert err.count("non-finite loss (weights not updated)") == 5 and "done: 6 steps (5 skipped" in err
    assert [r["step"] for r in metrics(skip)] == [1]


# -- signals: subprocesses, as a real preemption or crash would be --------------------------------------

def test_sigterm_saves_a_checkpoint_and_exits(pairs, tmp_path):
    run = tmp_path / "run"
    paused = Paused(2, "train", *FAST, "--data", pairs, "--batch-size", "4", "--epochs", "50", "--output", run,
                    at="train_step")
    _, log = paused.stop(signal.SIGTERM)  # lands in step 3; ranks agree to stop in the next step, then save
    assert paused.proc.returncode == 143, log
    assert "stopped by SIGTERM after step 4" in log and "--resume latest" in log
    assert checkpoints(run) == ["step_000000004.pt"]
    from coca_cli.train.checkpoints import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "step_000000004.pt")["step"] == 4


def test_sigkill_then_resume_latest_gives_the_same_weights(pairs, tmp_path):
    args = [*FAST, "--data", pairs, "--batch-size", "4", "--epochs", "2", "--save-every-n-steps", "3",
            "--workers", "1"]
    assert run_cli("train", *args, "--output", tmp_path / "whole") == 0
    run = tmp_path / "killed"
    paused = Paused(7, "train", *args, "--output", run, at="train_step")  # between checkpoints 6 and 9, of 24 steps
    paused.stop(signal.SIGKILL)
    assert paused.proc.returncode == -signal.SIGKILL
    assert metrics(run)[-1]["step"] == 7 and checkpoints(run)[-1] == "step_000000006.pt"
    assert not (run / "final").exists()
    assert run_cli("train", *args, "--output", run, "--resume", "latest") == 0
    assert_same_weights(weights(tmp_path / "whole"), weights(run), atol=0)
    assert [r["step"] for r in metrics(run)] == list(range(1, 25))  # lines after the checkpoint replaced


# -- checkpoints are weights ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted(pairs, tmp_path_factory):
    """A run stopped by Ctrl-C after step 2 (as the first Ctrl-C does: checkpoint, then exit 130)."""
    from coca_cli.train import loop as train_module

    run = tmp_path_factory.mktemp("interrupted") / "run"
    original = train_module.Trainer.train_step

    def ctrl_c_during_step_2(self, micro, stop):
        if self.step == 1:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what Ctrl-C runs, without a real signal
        return original(self, micro, stop or self.step == 1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module.Trainer, "train_step", ctrl_c_during_step_2)
        assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--output", run) == 130
    assert checkpoints(run) == ["step_000000002.pt"] and not (run / "final").exists()
    return run / "checkpoints" / "step_000000002.pt"


@pytest.mark.parametrize("command", [
    ["caption", "{image}", "--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"],
    ["classify", "{image}", "--labels", "zero,one,two", "--json"],
    ["retrieve", "--images", "{image}", "--query", "the digit zero", "--json"],
    ["eval", "retrieval", "--data", "{pairs}"],
    ["finetune", "--data", "{pairs}", "--batch-size", "8", "--train-num-samples", "8", "--workers", "0",
     "--output", "{tmp}/ft"],
    ["train", "--data", "{pairs}", "--batch-size", "8", "--train-num-samples", "8", "--epochs", "1", "--workers", "0",
     "--output", "{tmp}/train"],
    ["convert", "{checkpoint}", "--output", "{tmp}/native"],
], ids=lambda command: " ".join(command[:2]) if command[0] == "eval" else command[0])
def test_a_training_checkpoint_is_weights_wherever_pretrained_is_accepted(command, interrupted, pairs, tmp_path,
                                                                           capsys):
    """No --model: the config comes from the checkpoint."""
    values = {"image": pairs.parent / "000.png", "pairs": pairs, "tmp": tmp_path, "checkpoint": interrupted}
    args = [a.format(**values) for a in command]
    if command[0] != "convert":
        args += ["--pretrained", str(interrupted)]
    assert run_cli(*args) == 0, capsys.readouterr().err


def test_the_checkpoint_an_interrupt_leaves_is_as_usable_as_final(interrupted, pairs, tmp_path, capsys):
    from coca_cli.train.checkpoints import load_checkpoint

    assert run_cli("convert", interrupted, "--output", tmp_path / "native") == 0
    assert_same_weights(load_file(str(tmp_path / "native" / "model.safetensors")),
                        load_checkpoint(interrupted)["model"], atol=0)
    image = pairs.parent / "000.png"
    captions = []
    for pretrained in (interrupted, tmp_path / "native"):
        capsys.readouterr()
        assert run_cli("caption", image, "--pretrained", pretrained, "--seq-len", "6", "--min-seq-len", "2",
                       "--num-beams", "2", "--num-beam-groups", "1") == 0
        captions.append(capsys.readouterr().out)
    assert captions[0] == captions[1] and captions[0].strip()


def test_the_last_checkpoint_of_a_run_holds_the_final_weights(pairs, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--output", run) == 0
    [last] = checkpoints(run)
    assert run_cli("convert", run / "checkpoints" / last, "--output", tmp_path / "native") == 0
    assert_same_weights(load_file(str(tmp_path / "native" / "model.safetensors")), weights(run), atol=0)
    assert json.loads((tmp_path / "native" / "config.json").read_text()) == json.loads(
        (run / "final" / "config.json").read_text())


# -- the schedule on small data ---------------------------------------------------------------------

def test_a_warmup_longer_than_the_run_is_shortened_with_one_warning(pairs, tiny, tmp_path, capsys):
    _, weights_folder = tiny
    # coca finetune's default warmup (1000) on 8 steps: 10% of 8 rounds to 1 step, the peak at once
    assert run_cli("finetune", "--pretrained", weights_folder, "--data", pairs, "--batch-size", "8", "--workers", "0",
                   "--train-num-samples", "48", "--epochs", "1", "--log-every-n-steps", "1",
                   "--output", tmp_path / "ft") == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert ("warning: --warmup 1000 is not shorter than this run (6 steps): the learning rate would stay far below "
            "--lr; warming up over 1 step instead (10% of the run)\n") in err
    lrs = [r["lr"] for r in metrics(tmp_path / "ft")]
    assert lrs[0] == 1e-5 and lrs == sorted(lrs, reverse=True)
    # coca train's default warmup (10000) on 18 steps: 2 steps
    assert run_cli("train", *fast_without("--warmup"), "--data", pairs, "--batch-size", "8", "--epochs", "3",
                   "--output", tmp_path / "train") == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "--warmup 10000 is not shorter than this run (18 steps)" in err
    assert "warming up over 2 steps instead" in err
    lrs = [r["lr"] for r in metrics(tmp_path / "train")]
    assert lrs[:3] == [5e-4, 1e-3, 1e-3] and lrs[3] < 1e-3  # warmup, then the cosine from its peak
    # a warmup that fits is kept, without a word
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--warmup", "5",
                   "--output", tmp_path / "fits") == 0
    assert "warning" not in capsys.readouterr().err
    assert [r["lr"] for r in metrics(tmp_path / "fits")][:2] == [1e-3 / 5, 2e-3 / 5]


# -- one definition of retrieval recall --------------------------------------------------------------

def test_validation_recall_equals_coca_eval_retrieval(tmp_path, capsys):
    """6 images with 5 captions each (a COCO-like table): validation during training and `coca eval
    retrieval` of the final weights report the same Recall@1/5, CLIP_benchmark's."""
    rows = ["filepath,title"]
    for i in range(6):
        digit_image(i).save(tmp_path / f"{i}.png")
        word = WORDS[_digits().target[i]]
        rows += [f"{i}.png,{text}" for text in (f"the digit {word}", f"a handwritten {word}", word,
                                                 f"a {word} in black and white", f"the number {word} written by hand")]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert run_cli("train", *FAST, "--data", tmp_path / "val.csv", "--val-data", tmp_path / "val.csv",
                   "--batch-size", "8", "--epochs", "1", "--output", run) == 0
    [val] = [r for r in metrics(run) if r.get("split") == "val"]
    assert val["val_samples"] == 30
    assert run_cli("eval", "retrieval", "--data", tmp_path / "val.csv", "--pretrained", run / "final",
                   "--batch-size", "8", "--output", tmp_path / "eval.json") == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    for k in (1, 5):
        assert val[f"image_to_text_R@{k}"] == evaluated[f"text_retrieval_recall@{k}"]
        assert val[f"text_to_image_R@{k}"] == evaluated[f"image_retrieval_recall@{k}"]


# -- progress --------------------------------------------------------------------------------------

def _plain(text: str) -> str:
    """What a terminal shows, roughly: control sequences dropped, carriage returns as new lines."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")


@pytest.mark.parametrize("columns", [80, 100])
def test_the_training_bar_shows_steps_and_eta_on_a_narrow_terminal(columns, pairs, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from coca_cli.cli import train as train_cli

    screen = io.StringIO()
    terminal = Console(file=screen, width=columns, force_terminal=True, color_system=None, soft_wrap=True,
                       markup=False, highlight=False)
    monkeypatch.setattr(train_cli, "err_console", terminal)
    assert run_cli("train", *FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1",
                   "--output", tmp_path / "run") == 0
    bars = [line for line in _plain(screen.getvalue()).splitlines() if line.startswith("training")]
    assert bars and all(len(line) <= columns for line in bars)
    assert re.match(r"training .* 6/6 \d+:\d\d:\d\d epoch 0 ", bars[-1]), bars[-1]  # the final frame


def test_plain_progress_lines_when_stderr_is_not_a_terminal(pairs, tmp_path, capsys, monkeypatch):
    from coca_cli.train.progress import Progress

    args = [*FAST, "--data", pairs, "--batch-size", "8", "--epochs", "1", "--log-every-n-steps", "100"]
    monkeypatch.setattr(Progress, "plain_every_s", float("inf"))  # as if every step were quick
    assert run_cli("train", *args, "--output", tmp_path / "a") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(lines) == 1 and re.match(r"step 6/6  ETA 0:00:00  epoch 0  contrastive ", lines[0]), lines
    monkeypatch.setattr(Progress, "plain_every_s", 0)  # as if every step took longer than the period
    assert run_cli("train", *args, "--output", tmp_path / "b") == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{step}/6" for step in range(1, 7)]
    assert all(re.match(r"step \d/6  ETA \d+:\d\d:\d\d  epoch 0", line) for line in lines), lines


def test_default_workers_never_exceed_the_cpus(pairs, tmp_path, monkeypatch):
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli("train", *fast_without("--workers"), "--data", pairs,
                       "--batch-size", "8", "--epochs", "1", "--train-num-samples", "16",
                       "--output", tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["workers"] == 2
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
    from coca_cli.train.distributed import default_workers

    assert default_workers(env={}) == 2 and default_workers(env={"LOCAL_WORLD_SIZE": "2"}) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(env={}) == 4 and default_workers(env={"LOCAL_WORLD_SIZE": "8"}) == 4
