"""The command line: help with examples, version, models, and one-line errors."""

import json
import subprocess
import sys

import pytest

from coca_cli import get_model_config
from coca_cli.errors import CocaError
from conftest import ROOT, run_cli

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
    assert {"train", "finetune", "caption", "classify", "retrieve", "prepare-coco", "convert"} <= {c[0] for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(command, capsys):
    assert run_cli(*command, "--help") == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"coca {' '.join(command)}" in out


def test_version(capsys):
    from coca_cli import __version__

    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"coca {__version__}"


def test_models_lists_configs_and_published_weights(capsys):
    assert run_cli("models", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {"coca_ViT-B-32", "coca_ViT-L-14", "coca_base", "coca_roberta-ViT-B-32", "coca_tiny"} <= set(listed)
    assert listed["coca_ViT-L-14"] == ["laion2b_s13b_b90k", "mscoco_finetuned_laion2b_s13b_b90k"]


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

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if `coca[hf]` were not installed
    with pytest.raises(CocaError, match=r"pip install 'coca\[hf\]'"):
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
