"""`coca train --compile`: the same run as eager, to fp32 rounding, with the same checkpoints."""

import json

import pytest
import torch
import torch._inductor.config

from conftest import run_cli
from test_train import FAST, assert_same_weights, metrics, pairs, weights  # noqa: F401 - pairs is a fixture


def test_a_compiled_run_resumed_from_an_eager_checkpoint_continues_it(pairs, tmp_path, capsys):  # noqa: F811
    """One compiled run (resuming an eager checkpoint, validating at the end) against the eager run
    of the same 4 steps: the same losses, weights and checkpoint keys (no ``_orig_mod.`` prefix).
    Step 3 has another number of caption tokens than step 2: the graphs recompiled for it count too."""
    from coca_cli.train.checkpoints import load_checkpoint

    common = [*FAST, "--data", pairs, "--val-data", pairs, "--val-num-samples", "8", "--batch-size", "8",
              "--train-num-samples", "32", "--epochs", "1"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_cli("train", *common, "--save-every-n-steps", "1", "--keep", "4", "--output", eager) == 0
    with torch._inductor.config.patch(compile_threads=1):  # no pool of compile workers to start
        assert run_cli("train", *common, "--compile", "--output", compiled,
                       "--resume", eager / "checkpoints" / "step_000000001.pt") == 0, capsys.readouterr().err
    assert json.loads((compiled / "train_config.json").read_text())["compile"] is True
    train_eager, train_compiled = ([r for r in metrics(run) if "split" not in r] for run in (eager, compiled))
    assert [r["step"] for r in train_compiled] == [2, 3, 4]
    for a, b in zip(train_eager[1:], train_compiled):
        for key in ("contrastive_loss", "caption_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (b["step"], key)
    [val_eager], [val_compiled] = ([r for r in metrics(run) if r.get("split") == "val"] for run in (eager, compiled))
    assert val_compiled["val_caption_loss"] == pytest.approx(val_eager["val_caption_loss"], rel=1e-4)
    assert_same_weights(weights(eager), weights(compiled), atol=1e-4)
    a, b = (load_checkpoint(run / "checkpoints" / "step_000000004.pt") for run in (eager, compiled))
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_compile_without_a_cxx_compiler_is_one_line(pairs, tmp_path, capsys, without_cxx_compiler):  # noqa: F811
    assert run_cli("train", *FAST, "--data", pairs, "--compile", "--output", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err == "coca: error: --compile on CPU needs a C++ compiler: install g++ (or set CXX to one)\n"
    assert not (tmp_path / "run").exists()
