"""Issue 13, class 2: nothing non-finite is accepted, saved, exported or printed; and (class 9) a
damaged newest checkpoint under --resume latest points at the next-older good one.

Every instance runs through the CLI and checks the exit code, the one-line message and that what
was already written (checkpoints, final/, output files) is still there, byte for byte.
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PHOTOS, one_error_line, run_cli
from test_train import FAST, pairs  # noqa: F401 - the training-pairs fixture

PHOTO = PHOTOS[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: what must survive a failed command untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(err: str) -> str:
    """The one error line that stderr ``err`` ends with (progress and status lines may come before it)."""
    assert err.count("coca: error: ") == 1 and err.endswith("\n"), err
    last = err.splitlines()[-1]
    assert last.startswith("coca: error: "), err
    return last


def poisoned(native: Path, folder: Path, tensor: str, value: float) -> Path:
    """A copy of the native weights folder ``native`` with one element of ``tensor`` set to ``value``."""
    state = load_file(str(native / "model.safetensors"))
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[0] = value
    folder.mkdir()
    shutil.copy(native / "config.json", folder / "config.json")
    save_file(state, str(folder / "model.safetensors"))
    return folder


# -- option values: finite and in range, refused before anything starts ------------------------------

TRAIN_OPTIONS = [
    ("--lr", "inf"), ("--lr", "1e39"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--lr", "0"),
    ("--wd", "inf"), ("--wd", "-0.1"), ("--grad-clip-norm", "nan"), ("--grad-clip-norm", "-1"),
    ("--grad-clip-norm", "inf"), ("--eps", "inf"), ("--eps", "0"), ("--beta1", "nan"), ("--beta2", "1"),
    ("--coca-caption-loss-weight", "inf"), ("--coca-contrastive-loss-weight", "nan"),
    ("--coca-contrastive-loss-weight", "-1"),
]


@pytest.mark.parametrize("command", ["train", "finetune"])
@pytest.mark.parametrize("option,value", TRAIN_OPTIONS)
def test_training_options_must_be_finite_and_in_range(command, option, value, pairs, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = [command, *FAST, "--data", pairs, "--batch-size", "8", "--train-num-samples", "8", "--output", run,
            "--pretrained", tiny[1], option, value]
    assert run_cli(*args) == 2
    err = one_error_line(capsys)
    assert f"{option} must be a finite number" in err and f"not {float(value)}" in err, err
    assert option[2:].replace("-", "_") + "=" not in err  # spelled as typed, not as a Python parameter
    assert not run.exists()  # refused before the run folder, the model or the data were touched


def test_every_float_training_setting_has_a_range():
    """A float setting added later cannot escape the check: it must be given a range."""
    from coca_cli.train.config import FLOAT_RANGES, TrainConfig

    floats = {f.name for f in dataclasses.fields(TrainConfig) if "float" in f.type}
    assert floats == set(FLOAT_RANGES)


@pytest.mark.parametrize("option,value", [
    ("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "1e39"), ("--temperature", "-1"),
    ("--repetition-penalty", "inf"), ("--repetition-penalty", "nan"), ("--top-p", "nan"), ("--top-p", "inf"),
])
@pytest.mark.parametrize("command", ["caption", "eval captions"])
def test_generation_options_must_be_finite_and_in_range(command, option, value, tiny, tmp_path, capsys):
    refs = tmp_path / "refs.tsv"
    refs.write_text(f"filepath\ttitle\n{PHOTO}\ta photo\n")
    out = tmp_path / ("out.jsonl" if command == "caption" else "out.json")
    inputs = [PHOTO] if command == "caption" else ["--data", refs]
    assert run_cli(*command.split(), *inputs, "--pretrained", tiny[1], "--output", out, option, value) == 2
    err = one_error_line(capsys)
    assert option in err and option[2:].replace("-", "_") + "=" not in err, err
    assert "finite" in err or "(0, 1]" in err, err
    assert not out.exists()


# -- non-finite weights are never checkpointed or exported ------------------------------------------

def test_a_diverged_model_is_never_checkpointed_or_exported(pairs, tmp_path, capsys):
    # 2 steps an epoch; a learning rate just below float32's maximum makes Adam's first update inf
    common = [*FAST, "--data", pairs, "--batch-size", "8", "--train-num-samples", "16"]
    huge_lr = ["--lr", "3e38", "--warmup", "0"]

    # diverging in the only step: no checkpoint, no final/
    fresh = tmp_path / "fresh"
    assert run_cli("train", *common, "--epochs", "1", "--train-num-samples", "8", *huge_lr, "--output", fresh) == 1
    err = error_line(capsys.readouterr().err)
    assert "training diverged at step 1" in err and "NaN or inf" in err and "no checkpoint was saved" in err, err
    assert not (fresh / "final").exists() and not list((fresh / "checkpoints").glob("*"))

    # a good epoch (checkpoint step 2, final/), then resumed with the huge rate: step 3 diverges
    run = tmp_path / "run"
    assert run_cli("train", *common, "--epochs", "1", "--output", run) == 0
    capsys.readouterr()
    before = snapshot(run / "checkpoints"), snapshot(run / "final")
    # caught when saving right after step 3, or at step 4, whose loss is NaN: skipping non-finite
    # losses cannot help once the weights themselves are lost
    for caught_by in (["--save-every-n-steps", "1"], ["--skip-nonfinite"]):
        assert run_cli("train", *common, "--epochs", "2", *huge_lr, *caught_by, "--output", run,
                       "--resume", "latest") == 1
        err = error_line(capsys.readouterr().err)
        good = run / "checkpoints" / "step_000000002.pt"
        assert "training diverged at step 3" in err and f"the last good checkpoint is {good}" in err, err
        assert f"--resume {good}" in err
        assert (snapshot(run / "checkpoints"), snapshot(run / "final")) == before

    # the run goes on from the good checkpoint with a sane rate
    assert run_cli("train", *common, "--epochs", "2", "--output", run, "--resume", "latest") == 0
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("tensor,value", [("logit_scale", float("nan")), ("text.ln_final.weight", float("inf")),
                                          ("visual.proj", float("-inf"))])
def test_training_refuses_damaged_starting_weights(tensor, value, pairs, tiny, tmp_path, capsys):
    damaged = poisoned(tiny[1], tmp_path / "damaged", tensor, value)
    run = tmp_path / "run"
    # finetune: without the contrastive loss, a NaN logit_scale would never show in the loss
    assert run_cli("finetune", *FAST, "--data", pairs, "--batch-size", "8", "--train-num-samples", "8",
                   "--pretrained", damaged, "--output", run) == 1
    err = error_line(capsys.readouterr().err)
    assert f"tensor {tensor} of the starting weights ({damaged})" in err and "damaged" in err, err
    assert not (run / "final").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("tensor,value", [("visual.conv1.weight", float("nan")), ("text.cls_emb", float("inf")),
                                          ("logit_scale", float("-inf")),
                                          ("text_decoder.text_projection", float("nan"))])
@pytest.mark.parametrize("to", ["native", "openclip"])
def test_convert_refuses_nonfinite_weights(tensor, value, to, tiny, tmp_path, capsys):
    damaged = poisoned(tiny[1], tmp_path / "damaged", tensor, value)
    sources = [damaged, damaged / "model.safetensors"]
    for n, source in enumerate(sources):
        out = tmp_path / f"out{n}"
        assert run_cli("convert", source, "--model", "coca_tiny", "--to", to, "--output", out) == 1
        err = one_error_line(capsys)
        assert f"tensor {tensor} holds NaN or inf" in err and "damaged" in err, err
        assert not out.exists()


# -- non-finite scores are reported, never printed ----------------------------------------------------

@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """An image folder for zero-shot evaluation, a pairs table and a captions file for retrieval."""
    root = tmp_path_factory.mktemp("collection")
    for label, photo in zip(("first", "second"), PHOTOS):
        (root / "classes" / label).mkdir(parents=True)
        shutil.copy(photo, root / "classes" / label / photo.name)
    (root / "pairs.tsv").write_text("filepath\ttitle\n" + "".join(f"{p}\ta photo\n" for p in PHOTOS[:2]))
    (root / "captions.txt").write_text("a dog\na cat\n")
    return root


def commands(root: Path, tmp: Path) -> dict:
    return {
        "classify": ["classify", PHOTO, "--labels", "dog,cat"],
        "retrieve images": ["retrieve", "--images", root / "classes", "--query", "a dog", "--index", tmp / "idx"],
        "retrieve texts": ["retrieve", "--texts", root / "captions.txt", "--image", PHOTO],
        "eval zeroshot": ["eval", "zeroshot", "--data", root / "classes"],
        "eval retrieval": ["eval", "retrieval", "--data", root / "pairs.tsv"],
    }


@pytest.mark.parametrize("command,tensor,value,kind", [
    ("classify", "visual.conv1.weight", float("nan"), "image"),
    ("classify", "text.text_projection", float("-inf"), "text"),
    ("retrieve images", "visual.ln_post.bias", float("inf"), "image"),
    ("retrieve images", "text.cls_emb", float("nan"), "text"),
    ("retrieve texts", "visual.conv1.weight", float("nan"), "image"),
    ("retrieve texts", "text.text_projection", float("inf"), "text"),
    ("eval zeroshot", "visual.ln_post.bias", float("-inf"), "image"),
    ("eval zeroshot", "text.cls_emb", float("nan"), "text"),
    ("eval retrieval", "visual.conv1.weight", float("inf"), "image"),
    ("eval retrieval", "text.text_projection", float("nan"), "text"),
])
def test_damaged_weights_are_reported_instead_of_nan_scores(command, tensor, value, kind, collection, tiny,
                                                            tmp_path, capsys):
    damaged = poisoned(tiny[1], tmp_path / "damaged", tensor, value)
    args = commands(collection, tmp_path)[command]
    assert run_cli(*args, "--pretrained", damaged, "--format", "jsonl") == 1
    out, err = capsys.readouterr()
    assert out == ""  # no result at all, NaN or otherwise: each would be scored against damaged features
    err = error_line(err)
    assert err.startswith(f"coca: error: the model produced non-finite {kind} features for "), err
    assert f"its weights are damaged (tensor {tensor} holds NaN or inf)" in err, err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
def test_a_damaged_temperature_is_reported_instead_of_nan_probabilities(value, tiny, tmp_path, capsys):
    damaged = poisoned(tiny[1], tmp_path / "damaged", "logit_scale", value)
    out = tmp_path / "labels.jsonl"
    assert run_cli("classify", PHOTO, "--labels", "dog,cat", "--pretrained", damaged, "--output", out) == 1
    err = one_error_line(capsys)
    assert "logit_scale" in err and "damaged" in err, err
    assert not out.exists() or "nan" not in out.read_text().lower()


# -- a damaged newest checkpoint under --resume latest --------------------------------------------------

def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint" * 64)


@pytest.fixture(scope="module")
def finished_run(pairs, tmp_path_factory):
    """A run folder with checkpoints at steps 1, 2 and 3, and the arguments that made it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    args = [*FAST, "--data", pairs, "--batch-size", "8", "--train-num-samples", "24", "--epochs", "1",
            "--save-every-n-steps", "1"]
    assert run_cli("train", *args, "--output", run) == 0
    return run, args


@pytest.mark.parametrize("damage,newest_damaged,resume", [
    (truncate_half, 1, "latest"), (empty, 1, "latest"), (garbage, 1, "latest"), (truncate_half, 2, "latest"),
    (truncate_half, 1, "{run}"),  # a run folder resumes from its newest checkpoint too
])
def test_a_damaged_newest_checkpoint_names_the_next_older_good_one(damage, newest_damaged, resume, finished_run,
                                                                   tmp_path, capsys):
    run = shutil.copytree(finished_run[0], tmp_path / "run")
    args = [*finished_run[1], "--output", run]
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step_000000001.pt", "step_000000002.pt", "step_000000003.pt"]
    for name in names[-newest_damaged:]:
        damage(folder / name)
    before = snapshot(run)
    good = folder / names[-newest_damaged - 1]
    assert run_cli("train", *args, "--resume", resume.format(run=run)) == 2
    err = error_line(capsys.readouterr().err)
    assert f"{folder / names[-1]}" in err, err
    assert f"the next-older good checkpoint is {good}: continue from it with --resume {good}" in err
    assert snapshot(run) == before  # nothing deleted, nothing rewritten
    assert run_cli("train", *args, "--resume", good) == 0  # the advice works
    assert sorted(p.name for p in folder.iterdir()) == names
