"""Two CPU processes (gloo), launched by `coca train --gpus 2` itself through torchrun, against one
process on the same global batch: same losses and, where the loss is exact by construction, the
same updated weights (1e-5). See coca_cli/train/loss.py's docstring for why each case holds.

Captions have different lengths, so the two ranks hold different numbers of caption tokens and
the caption loss normalisation is exercised too.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_train import caption, digit_image

STEPS = 2
# lr 1e-4: Adam divides each gradient by its own magnitude, so components that are ~0 up to float
# rounding (summed in another order by two processes) can move by a small fraction of lr either way.
COMMON = ["--model", "coca_tiny", "--workers", "0", "--precision", "fp32", "--lr", "1e-4", "--warmup", "1",
          "--log-every-n-steps", "1", "--epochs", "1", "--train-num-samples", str(8 * STEPS),
          "--save-every-n-steps", "1", "--keep", "5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rows = ["filepath,title"]
    for i in range(8 * STEPS):
        digit_image(100 + i).save(root / f"{i}.png")
        rows.append(f"{i}.png,{caption(100 + i)}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process, global batch 8."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert run_cli("train", *COMMON, "--data", data, "--batch-size", "8", "--gpus", "1", "--output", run) == 0
    return run


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["contrastive_loss"], r["caption_loss"]) for r in rows]


def step_weights(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:09d}.pt", weights_only=True)


def max_diff(a: dict, b: dict, keys) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


def two_processes(data, tmp_path, *flags):
    run = tmp_path / "run"
    assert run_cli("train", *COMMON, "--data", data, "--batch-size", "4", "--gpus", "2", "--output", run, *flags) == 0
    assert step_weights(run, STEPS)["world_size"] == 2
    return run


@pytest.mark.parametrize("flags", [[], ["--gather-with-grad"], ["--local-loss", "--gather-with-grad"]],
                         ids=["plain", "gather-with-grad", "local-loss+gather-with-grad"])
def test_two_processes_equal_one(flags, data, single, tmp_path):
    run = two_processes(data, tmp_path, *flags)
    ref, got = losses(single), losses(run)
    assert [s for s, *_ in got] == [s for s, *_ in ref] == list(range(1, STEPS + 1))
    for (_, c1, p1), (_, c2, p2) in zip(ref, got):
        assert c2 == pytest.approx(c1, rel=1e-5) and p2 == pytest.approx(p1, rel=1e-5)
    a = load_file(str(single / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert max_diff(a, b, a.keys()) <= 1e-5


def test_local_loss_without_gather_with_grad_is_an_approximation(data, single, tmp_path):
    """open_clip's semantics: the gradient through the other ranks' copies of this rank's features
    is never computed. The losses and the parameters that only the caption loss or only the
    logits reach (the decoder, logit_scale) still match after one step; the towers do not."""
    run = two_processes(data, tmp_path, "--local-loss")
    (_, c1, p1), (_, c2, p2) = losses(single)[0], losses(run)[0]
    assert c2 == pytest.approx(c1, rel=1e-5) and p2 == pytest.approx(p1, rel=1e-5)
    a, b = step_weights(single, 1)["model"], step_weights(run, 1)["model"]
    exact = [k for k in a if k.startswith("text_decoder.") or k == "logit_scale"]
    towers = [k for k in a if k.startswith(("visual.", "text."))]
    assert max_diff(a, b, exact) <= 1e-5
    assert max_diff(a, b, towers) > 1e-4  # a real difference, not rounding


def test_two_processes_train_without_the_zero_weighted_loss(data, tmp_path, capfd):
    """Fine-tuning's recipe (contrastive weight 0): what only the contrastive loss would train gets
    no gradient, so it is frozen and DDP needs no search for unused parameters (before, every rank
    warned that find_unused_parameters found none). Two processes still equal one."""
    flags = ["--coca-contrastive-loss-weight", "0"]
    one = tmp_path / "one"
    assert run_cli("train", *COMMON, "--data", data, "--batch-size", "8", "--gpus", "1", "--output", one, *flags) == 0
    run = tmp_path / "two"
    assert run_cli("train", *COMMON, "--data", data, "--batch-size", "4", "--gpus", "2", "--output", run, *flags) == 0
    assert "find_unused_parameters" not in capfd.readouterr().err
    assert [(s, c) for s, c, _ in losses(run)] == [(1, 0.0), (2, 0.0)]
    for (_, _, p1), (_, _, p2) in zip(losses(one), losses(run)):
        assert p2 == pytest.approx(p1, rel=1e-5)
    a = load_file(str(one / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert max_diff(a, b, a.keys()) <= 1e-5
    start = step_weights(run, 1)["model"]
    for name in ("logit_scale", "text.text_projection", "visual.proj"):
        assert torch.equal(start[name], b[name])
    assert not torch.equal(start["text_decoder.text_projection"], b["text_decoder.text_projection"])
