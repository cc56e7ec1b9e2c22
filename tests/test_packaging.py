"""The package as users install it: the wheel's name and contents, its imports, and the
README's first command in a clean virtual environment."""

import ast
import email.parser
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import PHOTOS, ROOT
from hub_server import HubServer

PACKAGE_SOURCES = sorted((ROOT / "coca_cli").rglob("*.py"))

# Imports the wheel does not declare, each asked for by name in the message of the feature needing it.
OPTIONAL_IMPORTS = {"wandb"}  # `coca train --report-to wandb`

# Install hints that would fetch someone else's package: `coca` on PyPI is unrelated to this project.
WRONG_HINTS = [re.compile(r"""pip install\s+['"]?coca(?!-cli)"""), re.compile(r"\bcoca\[")]
CHECKOUT_HINT = re.compile(r"""pip install\s+['"]?\.""")  # an installed package has no checkout to point at

# Already installed and gigabytes big: the clean venv links them instead of downloading them again.
LINKED_DISTRIBUTIONS = re.compile(r"torch|torchvision|triton|nvidia-.*|cuda-.*")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(dist), "-q"], check=True, capture_output=True, cwd=dist)
    return next(dist.glob("coca_cli-*.whl"))


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for config in (ROOT / "models").glob("*.json"):
        assert f"coca_cli/model_configs/{config.name}" in names
    assert "coca_cli/data/bpe_simple_vocab_16e6.txt.gz" in names
    assert "coca_cli/data/LICENSE-bpe_simple_vocab.txt" in names

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


def test_distribution_is_coca_cli_and_install_hints_name_it(wheel):
    assert wheel_metadata(wheel)["Name"] == "coca-cli"
    wrong = []
    for path in [ROOT / "README.md", *PACKAGE_SOURCES]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            checkout_only = path.suffix == ".py" and CHECKOUT_HINT.search(line)
            if checkout_only or any(pattern.search(line) for pattern in WRONG_HINTS):
                wrong.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not wrong, "install hints that do not install coca-cli:\n" + "\n".join(wrong)


def test_readme_quickstart_is_two_commands_with_notes_for_cpu_and_apple():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)
    assert commands == ["pip install . && coca caption examples/images/", "pip install '.[test]' && python -m pytest"]
    assert "--index-url https://download.pytorch.org/whl/cpu" in quickstart  # CPU torch, not the CUDA build
    assert "--device mps" in quickstart


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_package_imports_only_what_the_wheel_declares(wheel):
    declared = set()
    for line in wheel_metadata(wheel).get_all("Requires-Dist"):
        requirement = Requirement(line)
        # hf: the optional text tower; parquet: `coca embed`'s Parquet metadata; faiss: retrieve --index-type
        optional = ("hf", "parquet", "faiss")
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in optional):
            declared.add(canonicalize_name(requirement.name))
    providers = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in PACKAGE_SOURCES:
        for module in _imported_modules(path) - set(sys.stdlib_module_names) - {"__future__", "coca_cli"}:
            distributions = {canonicalize_name(d) for d in providers.get(module, [])}
            if module not in OPTIONAL_IMPORTS and not distributions & declared:
                undeclared.add(f"{module} ({path.relative_to(ROOT)})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


# -- the README's first command, in a fresh venv with only the declared dependencies ---------------

def link_installed_torch(folder: Path) -> list[str]:
    """Symlinks in ``folder`` to this interpreter's torch, torchvision and their CUDA/triton
    distributions (code and .dist-info); returns ``name==version`` pins for them."""
    folder.mkdir()
    pins = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if not LINKED_DISTRIBUTIONS.fullmatch(name) or name in pins:
            continue
        pins[name] = f"{name}=={dist.version}"
        site = Path(dist.locate_file(""))
        for top in {file.parts[0] for file in dist.files or () if file.parts[0] != ".."}:
            if not (folder / top).exists():
                (folder / top).symlink_to(site / top)
    return list(pins.values())


def clean_venv(env_dir: Path, wheel: Path) -> Path:
    """A venv without system site-packages holding the wheel and its dependencies at their newest
    allowed versions; torch and its binaries are the ones installed here, linked through a .pth file."""
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    linked = env_dir.with_name("linked")  # outside the venv, and pinned: pip never uninstalls through the links
    pins = link_installed_torch(linked)
    (Path(site) / "linked_torch.pth").write_text(f"{linked}\n")
    (env_dir / "pins.txt").write_text("\n".join(pins) + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
                             "--constraint", str(env_dir / "pins.txt"), str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return python


def save_random_weights(model_name: str, path: Path) -> None:
    """Random weights of a full-size config as fp16 safetensors (half the bytes; the loader casts),
    drawn like the tests' open_clip references without building the model first. The decoder
    favours the end token, so captions stop at the shortest allowed length: seconds on a CPU."""
    from safetensors.torch import save_file

    from coca_cli.model.config import get_model_config
    from coca_cli.model.generation import EOS_TOKEN_ID
    from coca_cli.model.coca import CoCa

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in CoCa.from_config(get_model_config(model_name)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        state[name] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=gen)
        if name.endswith("logit_scale"):
            state[name].fill_(4.6)
        elif "ln_" in name and name.endswith("weight"):
            state[name] += 1
    state["text_decoder.ln_final.bias"].fill_(1)
    state["text_decoder.text_projection"][:, EOS_TOKEN_ID] = 1
    save_file(state, str(path))


def test_readme_first_command_in_a_clean_venv(tmp_path, wheel):
    python = clean_venv(tmp_path / "venv", wheel)
    probe = ("import importlib.metadata as m, importlib.util as u; print(m.version('huggingface_hub')); "
             "print([name for name in ('open_clip', 'transformers', 'pytest') if u.find_spec(name)])")
    hub_version, test_extra = subprocess.run([str(python), "-c", probe], check=True, capture_output=True,
                                             text=True).stdout.splitlines()
    assert int(hub_version.split(".")[0]) >= 1, hub_version  # what a plain `pip install .` resolves today
    assert test_extra == "[]"

    weights = tmp_path / "open_clip_model.safetensors"
    save_random_weights("coca_ViT-L-14", weights)
    command = "coca caption examples/images/"  # the README's, verbatim, with the venv first on PATH
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "COCA_", "PYTHON"))}
    env.update(PATH=f"{python.parent}{os.pathsep}{env['PATH']}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1")
    unreachable = dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "empty"),
                       HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    # huggingface_hub 1.x+ backs off for ~20 s before giving up: that run overlaps the captioning one.
    offline = subprocess.Popen(command, shell=True, cwd=ROOT, env=unreachable, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    repo = "laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k"  # the default model and tag
    with HubServer({f"{repo}/open_clip_model.safetensors": weights}) as hub:
        result = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True,
                                env=dict(env, HF_ENDPOINT=hub.url))
    offline_out, offline_err = offline.communicate(timeout=1800)

    assert result.returncode == 0, result.stderr
    assert hub.downloads("open_clip_model.safetensors") == 1
    captioned = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert captioned == [str(p.relative_to(ROOT)) for p in PHOTOS]

    assert offline.returncode == 2 and offline_out == ""
    lines = offline_err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coca: error: cannot download weights"), offline_err
    assert "--pretrained PATH" in lines[0] and repo in lines[0]
