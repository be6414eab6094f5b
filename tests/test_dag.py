"""dvc.yaml's stages depend on every project module they import, so that editing any of them
makes `dvc repro` rerun the stage (and only modules they import, so that nothing else does)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

PACKAGES = ("pipeline", "resattn")


def module_file(module: str) -> Path | None:
    for candidate in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module, not a module


def imported_files(module: str, found: dict[str, Path] | None = None) -> dict[str, Path]:
    """Every project module that importing `module` runs, with their files: what it imports,
    transitively, and each package's __init__ on the way."""
    found = {} if found is None else found
    path = module_file(module)
    if module in found or path is None:
        return found
    found[module] = path
    if "." in module:
        imported_files(module.rsplit(".", 1)[0], found)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                imported_files(name, found)
    return found


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_exactly_the_modules_it_imports(stage):
    command = STAGES[stage]["cmd"].split()
    assert command[:3] == ["exec", "python", "-m"], command  # why exec: dvc.yaml's header
    imported = {str(path.relative_to(ROOT)) for path in imported_files(command[3]).values()}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.endswith(".py")}
    assert not imported - listed, f"{stage} imports but does not depend on {sorted(imported - listed)}"
    assert not listed - imported, f"{stage} depends on but does not import {sorted(listed - imported)}"


def test_the_derivation_follows_imports_through_modules_and_packages():
    files = {str(path.relative_to(ROOT)) for path in imported_files("pipeline.train").values()}
    # pipeline.train -> pipeline.config -> resattn.model, and resattn/__init__ on the way
    assert {"pipeline/config.py", "resattn/model.py", "resattn/__init__.py", "pipeline/__init__.py"} <= files
    assert "pipeline/tune.py" not in files and "pipeline/predict.py" not in files
