"""`coca convert` and weight loading: every open_clip checkpoint layout, and refusals."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from coca_cli import create_model
from coca_cli.weights.checkpoint import load_state_dict
from coca_cli.errors import CocaError
from conftest import openclip_reference, run_cli


@pytest.fixture(scope="module")
def tiny_state():
    return openclip_reference("coca_tiny", seed=3).state_dict()


def _same_weights(folder, state):
    model = create_model(None, pretrained=folder)
    for name, tensor in state.items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("layout", ["plain.pt", "training.pt", "weights.bin", "weights.safetensors"])
def test_convert_reads_every_openclip_layout(tmp_path, tiny_state, layout):
    src = tmp_path / layout
    if layout == "training.pt":  # open_clip training checkpoint: DDP prefixes and optimizer state
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in tiny_state.items()},
                    "optimizer": {"state": {}, "param_groups": []}}, src)
    elif layout.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tiny_state.items()}, src)
    else:
        torch.save(tiny_state, src)
    out = tmp_path / "native"
    assert run_cli("convert", src, "--model", "coca_tiny", "--output", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["embed_dim"] == 64
    _same_weights(out, tiny_state)


def test_native_folder_and_files_work_as_pretrained(tmp_path, tiny_state):
    src = tmp_path / "w.bin"
    torch.save(tiny_state, src)
    assert run_cli("convert", src, "--model", "coca_tiny", "--output", tmp_path / "n") == 0
    for pretrained, model_name in [(tmp_path / "n", None), (tmp_path / "n" / "model.safetensors", "coca_tiny"),
                                   (src, "coca_tiny")]:
        model = create_model(model_name, pretrained=pretrained)
        assert torch.equal(model.logit_scale, tiny_state["logit_scale"])


def test_mismatched_checkpoint_is_refused_with_key_names(tmp_path, tiny_state, capsys):
    broken = dict(tiny_state)
    del broken["visual.proj"]
    broken["text.extra_weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pt")
    assert run_cli("convert", tmp_path / "broken.pt", "--model", "coca_tiny", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "missing keys: visual.proj" in err and "unexpected keys: text.extra_weight" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_for_another_config_names_shape_mismatch(tmp_path, tiny_state, capsys):
    torch.save(tiny_state, tmp_path / "tiny.pt")
    assert run_cli("convert", tmp_path / "tiny.pt", "--model", "coca_ViT-B-32", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "does not fit the model config" in err and "shape mismatch" in err and "Traceback" not in err


class _PlantsAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"logit_scale": _PlantsAFile(str(target))}, f, protocol=2)
    assert run_cli("convert", tmp_path / "evil.pt", "--model", "coca_tiny", "--output", tmp_path / "o") == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not target.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "checkpoint is empty"),
    (b"not a checkpoint at all", "not a plain-tensor PyTorch checkpoint"),
    (b"PK\x03\x04truncated zip", "not a PyTorch checkpoint or truncated"),
])
def test_garbage_files_give_one_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.bin").write_bytes(content)
    assert run_cli("convert", tmp_path / "bad.bin", "--model", "coca_tiny", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_truncated_safetensors(tmp_path, tiny_state):
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CocaError, match="not a valid safetensors file"):
        load_state_dict(tmp_path / "cut.safetensors")


def test_missing_checkpoint_and_unknown_target(tmp_path, capsys):
    assert run_cli("convert", tmp_path / "nope.pt", "--model", "coca_tiny", "--output", tmp_path / "o") == 2
    assert "not found" in capsys.readouterr().err
    torch.save({"a": torch.zeros(1)}, tmp_path / "a.pt")
    assert run_cli("convert", tmp_path / "a.pt", "--model", "coca_tiny", "--to", "onnx", "--output", tmp_path / "o") == 2
    assert "unknown conversion target" in capsys.readouterr().err
