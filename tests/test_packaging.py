"""The built wheel carries the model configs and BPE vocabulary, found from any directory."""

import json
import subprocess
import sys
import venv
import zipfile

from conftest import ROOT


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), "-q"], check=True, capture_output=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("coca-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for config in (ROOT / "models").glob("*.json"):
        assert f"coca_cli/model_configs/{config.name}" in names
    assert "coca_cli/bpe_simple_vocab_16e6.txt.gz" in names
    assert "coca_cli/LICENSE-bpe_simple_vocab.txt" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed",
                    "-q", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = env_dir / "bin" / "coca"
    result = subprocess.run([str(script), "models", "--json"], cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "coca_ViT-L-14" in json.loads(result.stdout)
    code = "import coca_cli, sys; print(coca_cli.__file__); print(coca_cli.get_tokenizer('coca_ViT-B-32')('a cat')[0, :4].tolist())"
    result = subprocess.run([str(python), "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    location, tokens = result.stdout.splitlines()
    assert str(env_dir) in location  # the installed wheel, not the checkout
    assert tokens == "[49406, 320, 2368, 49407]"
