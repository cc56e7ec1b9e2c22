"""Class 6 of issue 13: small inputs must not make memory unbounded.

Preprocessing costs memory in proportion to the output, whatever the image's aspect ratio; a model
config is checked (types, positive sizes, divisibility, its parameter count against the weights
and the machine) before any tensor is allocated. Whatever could allocate without bound runs in a
subprocess under RLIMIT_AS, so that a regression fails the test instead of taking the machine down.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_photo_dir, one_error_line, run_cli, subprocess_env

FAST_CAPTION = ["--seq-len", "6", "--min-seq-len", "2", "--num-beams", "2", "--num-beam-groups", "1"]
HEADROOM = 3 * 2 ** 30  # address space allowed above what importing torch took

# `coca ARGS` with its address space limited to what importing torch took plus HEADROOM: an allocation
# beyond it raises MemoryError instead of exhausting the machine.
COCA_LIMITED = f"""
import resource, sys
import torch, torchvision
from coca_cli.cli import main
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmPeak:"))
resource.setrlimit(resource.RLIMIT_AS, (peak + {HEADROOM}, peak + {HEADROOM}))
sys.exit(main(sys.argv[1:]))
"""

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmPeak in /proc (Linux)")


def run_limited(*args) -> subprocess.CompletedProcess:
    # One OpenMP thread and two malloc arenas: the address space a run reserves then does not grow
    # with the machine's core count, so the same limit holds on any machine.
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run([sys.executable, "-c", COCA_LIMITED, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


# -- preprocessing: O(output) for any aspect ratio -----------------------------------------------

def _extreme_images(folder: Path) -> list[Path]:
    """Small PNGs (a few KB) whose shortest-side resize alone would take gigabytes, in several modes,
    and a large but legal square (64 M pixels, under Pillow's bomb limit)."""
    specs = {"tall_1x1000000.png": ("RGB", (1, 1_000_000)), "wide_1000000x1.png": ("RGB", (1_000_000, 1)),
             "tall_2x600000_rgba.png": ("RGBA", (2, 600_000)), "wide_300000x3_gray.png": ("L", (300_000, 3)),
             "tall_1x500000_palette.png": ("P", (1, 500_000)), "square_8000.png": ("L", (8000, 8000))}
    paths = []
    for name, (mode, size) in specs.items():
        Image.new(mode, size, 90).save(folder / name)
        paths.append(folder / name)
    return paths


@needs_proc
@pytest.mark.parametrize("command", [
    ["caption", *FAST_CAPTION],
    ["classify", "--labels", "dog,cat,rocket"],
])
def test_extreme_aspect_ratios_are_preprocessed_in_bounded_memory(tiny, tmp_path, command):
    _, native = tiny
    (tmp_path / "photos").mkdir()
    photos = make_photo_dir(tmp_path / "photos")
    extreme = _extreme_images(photos)
    assert all(p.stat().st_size < 100_000 for p in extreme if "square" not in p.name)
    output = tmp_path / "results.jsonl"
    result = run_limited(*command, photos, "--pretrained", native, "--output", output)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MemoryError" not in result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in photos.iterdir())
    assert all(r.get("caption") or r.get("predictions") for r in records)


# -- model configs: validated before anything is allocated ---------------------------------------

def _config_with(native: Path, section, key, value) -> dict:
    config = json.loads((native / "config.json").read_text())
    (config[section] if section else config)[key] = value
    return config


def _weights_folder(tmp_path: Path, native: Path, config: dict) -> Path:
    """A native folder: the tiny model's weights, and ``config`` as its config.json."""
    folder = tmp_path / "weights"
    folder.mkdir()
    os.link(native / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# (section, key, value, what the one line must say)
BAD_FIELDS = [
    ("text_cfg", "layers", 2.5, "text_cfg.layers must be a positive integer, got 2.5"),
    ("text_cfg", "layers", "12", 'text_cfg.layers must be a positive integer, got "12"'),
    ("vision_cfg", "width", True, "vision_cfg.width must be a positive integer, got true"),
    ("multimodal_cfg", "heads", None, "multimodal_cfg.heads must be a positive integer, got null"),
    ("vision_cfg", "layers", 0, "vision_cfg.layers must be a positive integer, got 0"),
    (None, "embed_dim", -64, "embed_dim must be a positive integer, got -64"),
    ("vision_cfg", "mlp_ratio", -1, "vision_cfg.mlp_ratio must be a positive number, got -1"),
    ("text_cfg", "heads", 5, "text_cfg.width (64) must be a multiple of text_cfg.heads (5)"),
    ("vision_cfg", "head_width", 36, "vision_cfg.width (96) must be a multiple of vision_cfg.head_width (36)"),
    ("multimodal_cfg", "width", 128, "multimodal_cfg.width (128) must equal embed_dim (64)"),
]
COMMANDS = {
    "caption": lambda tmp, weights, photo: ["caption", photo, "--pretrained", weights, "--output", tmp / "out.jsonl"],
    "classify": lambda tmp, weights, photo: ["classify", photo, "--labels", "dog,cat", "--pretrained", weights,
                                             "--output", tmp / "out.jsonl"],
    "convert": lambda tmp, weights, photo: ["convert", weights, "--output", tmp / "out"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("section, key, value, message", BAD_FIELDS,
                         ids=[f"{s or 'top'}.{k}={v!r}" for s, k, v, _ in BAD_FIELDS])
def test_bad_config_beside_weights_is_refused_naming_the_field(tiny, photo_dir, tmp_path, capsys, command,
                                                               section, key, value, message):
    _, native = tiny
    weights = _weights_folder(tmp_path, native, _config_with(native, section, key, value))
    assert run_cli(*COMMANDS[command](tmp_path, weights, photo_dir / "chelsea.jpg")) == 2
    line = one_error_line(capsys)
    assert f"model config {weights / 'config.json'}: {message}\n" in line
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["--model JSON", "training checkpoint"])
def test_bad_config_from_model_json_or_training_checkpoint_is_refused(tiny, photo_dir, tmp_path, capsys, source):
    _, native = tiny
    config = _config_with(native, "text_cfg", "layers", 2.5)
    if source == "--model JSON":
        where = tmp_path / "my.json"
        where.write_text(json.dumps(config))
        args = ["--model", where, "--pretrained", native]
    else:
        from safetensors.torch import load_file

        where = tmp_path / "step_1.pt"
        torch.save({"format": "coca-train-checkpoint", "model_config": config,
                    "model": load_file(native / "model.safetensors")}, where)
        args = ["--pretrained", where]
    assert run_cli("caption", photo_dir / "chelsea.jpg", *args) == 2
    assert f"model config {where}: text_cfg.layers must be a positive integer, got 2.5\n" in one_error_line(capsys)


@needs_proc
@pytest.mark.parametrize("command, section, key, value", [
    ("caption", "text_cfg", "layers", 10_000_000),
    ("classify", "multimodal_cfg", "layers", 100_000),
    ("convert", "vision_cfg", "width", 100_000),
])
def test_config_far_larger_than_its_weights_is_refused_before_allocating(tiny, photo_dir, tmp_path, command,
                                                                         section, key, value):
    _, native = tiny
    config = _config_with(native, section, key, value)
    if key == "width":
        config["vision_cfg"]["head_width"] = 100  # a valid shape: only the size is absurd
    weights = _weights_folder(tmp_path, native, config)
    result = run_limited(*COMMANDS[command](tmp_path, weights, photo_dir / "chelsea.jpg"))
    err = result.stderr
    assert result.returncode == 2, err[-2000:]
    assert err.startswith(f"coca: error: model config {weights / 'config.json'} describes a model of ") \
        and err.count("\n") == 1, err
    assert f"mostly in {section} (" in err and f"{key} {value}" in err
    assert f"more than {weights / 'model.safetensors'} can hold" in err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out").exists()


def test_parameter_estimate_is_exact_for_the_built_in_models():
    """The estimate the size check relies on counts what the modules hold (built on the meta device)."""
    from coca_cli.model.config import get_model_config, list_models, parameter_counts
    from coca_cli.weights.catalog import count_parameters

    for name in list_models():
        cfg = get_model_config(name)
        if not cfg.text_cfg.hf_model_name:
            assert sum(parameter_counts(cfg).values()) == count_parameters(cfg), name
