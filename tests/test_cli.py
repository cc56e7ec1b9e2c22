"""The command line: help with examples, version, models, and one-line errors."""

import json
import subprocess
import sys

import pytest

from coca_cli import get_model_config
from coca_cli.errors import CocaError
from conftest import PHOTOS, ROOT, one_error_line, run_cli, subprocess_env

def _commands(group=None, prefix=()):
    """Every leaf command of the app, as argument lists: ["caption"], ["eval", "zeroshot"] ..."""
    import typer

    from coca_cli.cli import app

    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield [*prefix, name]


COMMANDS = list(_commands())


def test_every_designed_command_is_there():
    assert {"train", "finetune", "caption", "classify", "retrieve", "prepare-coco", "convert", "embed"} <= {c[0] for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(command, capsys):
    assert run_cli(*command, "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"coca {' '.join(command)}" in out


def test_version(capsys):
    from coca_cli import __version__

    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"coca {__version__}"


def _fake_hub_cache(root, repo: str, filename: str):
    """The Hugging Face cache layout for one downloaded file: refs/main names a snapshot holding it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "snapshots" / "0123abcd" / filename).write_bytes(b"weights")
    return root


def test_models_shows_size_inputs_published_weights_and_what_is_cached(tmp_path):
    from coca_cli import create_model

    cache = _fake_hub_cache(tmp_path / "hub", "laion/CoCa-ViT-B-32-laion2B-s13B-b90k", "open_clip_pytorch_model.bin")
    env = {**subprocess_env(), "HF_HUB_CACHE": str(cache)}
    env.pop("COCA_CACHE_DIR", None)

    def coca(*args):
        result = subprocess.run([sys.executable, "-m", "coca_cli", "models", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return result.stdout

    listed = json.loads(coca("--json"))
    assert {"coca_ViT-B-32", "coca_ViT-L-14", "coca_base", "coca_roberta-ViT-B-32", "coca_tiny"} <= set(listed)
    tiny = listed["coca_tiny"]
    assert tiny["parameters"] == sum(p.numel() for p in create_model("coca_tiny").parameters())
    assert (tiny["image_size"], tiny["context_length"], tiny["pretrained"]) == (64, 32, [])
    assert listed["coca_ViT-L-14"]["parameters"] // 10**6 == 638  # counted without allocating 2.5 GB
    assert [(p["tag"], p["cached"]) for p in listed["coca_ViT-B-32"]["pretrained"]] == [
        ("laion2b_s13b_b90k", True), ("mscoco_finetuned_laion2b_s13b_b90k", False)]
    assert not any(p["cached"] for p in listed["coca_ViT-L-14"]["pretrained"])
    table = coca()
    assert "7.0M" in table and "638.5M" in table and table.count("(cached)") == 1


def test_unknown_model_suggests_close_names(capsys):
    assert run_cli("convert", "x.pt", "--model", "coca_VIT-B-23", "--output", "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("coca: error: unknown model 'coca_VIT-B-23'") and "coca_ViT-B-32" in err
    assert err.count("\n") == 1


def test_usage_errors_are_one_line(capsys):
    assert run_cli("convert") == 2
    err = capsys.readouterr().err
    assert err.startswith("coca: error: Missing argument") and err.count("\n") == 1
    assert run_cli("no-such-command") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-command" in err


def test_missing_image_path_is_one_line(capsys, tmp_path):
    assert run_cli("caption", tmp_path / "nope.jpg") == 2
    err = capsys.readouterr().err
    assert err == f"coca: error: no such file or directory: {tmp_path / 'nope.jpg'}\n"


def test_missing_inputs_are_reported_before_torch_is_imported(tmp_path):
    """A typo costs a moment, not the seconds importing torch takes."""
    (tmp_path / "texts.txt").write_text("a dog\n")
    commands = [["caption", "nope.jpg"], ["classify", "nope.jpg", "--labels", "dog,cat"],
                ["retrieve", "--images", "nope/", "--query", "a dog"],
                ["retrieve", "--texts", "texts.txt", "--image", "nope.jpg"],
                ["classify", "texts.txt", "--labels-file", "labels.txt"],
                ["eval", "zeroshot", "--data", "val/"], ["eval", "retrieval", "--data", "pairs.tsv"],
                ["eval", "captions", "--data", "refs.tsv"],
                ["eval", "captions", "--data", "texts.txt", "--predictions", "captions.jsonl"]]
    code = ("import sys; from coca_cli.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    assert main(argv) == 2 and 'torch' not in sys.modules, argv\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["coca: error: no such file or directory: nope.jpg"] * 2 + [
        "coca: error: no such file or directory: nope/", "coca: error: no such file or directory: nope.jpg",
        "coca: error: no such labels file: labels.txt", "coca: error: no such folder: val",
        *(f"coca: error: no such file: {name}" for name in ("pairs.tsv", "refs.tsv", "captions.jsonl"))]


@pytest.mark.parametrize("device, backend", [("cuda", "cuda"), ("cuda:0", "cuda"), ("mps", "mps")])
def test_a_device_this_machine_lacks_is_a_usage_error(tiny, monkeypatch, capsys, device, backend):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert run_cli("caption", PHOTOS[0], "--pretrained", tiny[1], "--device", device) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"coca: error: --device {device}: ") and ("CUDA" if backend == "cuda" else "MPS") in err
    assert run_cli("classify", PHOTOS[0], "--labels", "a,b", "--pretrained", tiny[1], "--device", device) == 2
    assert one_error_line(capsys).startswith(f"coca: error: --device {device}: ")


def test_model_accepts_a_json_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text((ROOT / "models" / "coca_tiny.json").read_text())
    assert get_model_config(path).embed_dim == 64
    path.write_text('{"embed_dim": 8, "vision_cfg": {"bogus": 1}}')
    with pytest.raises(CocaError, match="unsupported keys: bogus"):
        get_model_config(path)
    path.write_text("{not json")
    with pytest.raises(CocaError, match="cannot read model config"):
        get_model_config(path)


def test_roberta_config_without_the_hf_extra_is_one_line(monkeypatch):
    from coca_cli import create_model

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if `coca-cli[hf]` were not installed
    with pytest.raises(CocaError, match=r"pip install 'coca-cli\[hf\]'"):
        create_model("coca_roberta-ViT-B-32")


def test_roberta_config_offline_is_one_line(tmp_path):
    code = "from coca_cli.cli import main; raise SystemExit(main(['convert', 'x.bin', '--model', " \
           "'coca_roberta-ViT-B-32', '--output', 'o']))"
    (tmp_path / "x.bin").write_bytes(b"")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "c"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "coca_cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("coca ")
