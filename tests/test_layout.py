"""The package shows its architecture: stages in order, and no module imports from a stage above it.

An image becomes a caption through model <- data <- weights <- tasks; a batch becomes a gradient
step through train, which may use everything below it; the command line sits on top.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "coca_cli"
STAGES = ["errors", "files", "devices", "model", "data", "weights", "tasks", "train", "cli"]  # lowest first
ROOT_MODULES = {"__init__", "__main__"}  # the public API and `python -m coca_cli`: above everything


def stage_of(module: str) -> str:
    """'coca_cli.model.coca' -> 'model'."""
    return module.split(".")[1]


def imported_modules(path: Path) -> set[str]:
    """Every coca_cli module a file imports, as absolute dotted names (lazy imports included)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])  # e.g. coca_cli.weights
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # level 1 is the file's own package, 2 its parent
                base = package.rsplit(".", node.level - 1)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target == "coca_cli" or target.startswith("coca_cli."):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import loop`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("coca_cli."))
    return {m for m in found if m.startswith("coca_cli.")}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) == 1 and parts[0] in ROOT_MODULES:
            continue
        yield path, parts[0]


def test_every_module_belongs_to_a_stage():
    stray = [str(path.relative_to(ROOT)) for path, stage in modules() if stage not in STAGES]
    assert stray == []


def test_no_module_imports_from_a_stage_above_it():
    upward = []
    for path, stage in modules():
        for module in imported_modules(path):
            target = stage_of(module)
            if target in STAGES and STAGES.index(target) > STAGES.index(stage):
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert upward == []


def test_the_checker_sees_relative_and_lazy_imports():
    """The rule above would pass vacuously if imports were missed: it must see these."""
    seen = imported_modules(PACKAGE / "weights" / "factory.py")
    assert "coca_cli.model.coca" in seen and "coca_cli.data.tokenizer" in seen
    seen = imported_modules(PACKAGE / "cli" / "caption.py")
    assert any(m.startswith("coca_cli.tasks.") for m in seen)
