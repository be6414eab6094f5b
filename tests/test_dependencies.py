"""Every third-party module the project imports comes from a distribution that pyproject.toml
declares and pins: nothing works only because another package happened to pull it in."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from helpers import ROOT

LOCAL = {"resattn", "pipeline", "helpers", "conftest"}
FOLDERS = ("resattn", "pipeline", "infra", "benchmarks", "tests")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """{top-level module: files importing it} over the project's Python files."""
    found: dict[str, set[str]] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared_and_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    declared = {}
    for requirement in requirements:
        name, _, pin = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)", requirement).group(1, 2, 3)
        declared[canonical(name)] = pin.strip()
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in imported_modules().items():
        if module in LOCAL or module in sys.stdlib_module_names:
            continue
        providers = distributions.get(module, [module])  # mlflow's module comes in three distributions
        if not any(canonical(provider) in declared for provider in providers):
            missing[module] = (providers, sorted(files)[:2])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    unpinned = [name for name, pin in declared.items() if name != "resattn" and not pin.startswith("==")]
    assert not unpinned, unpinned
