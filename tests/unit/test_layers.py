"""The packages import one way, down the layers, and this test reads every import (those inside functions
too) to keep it so:

    cli                         the commands: parse, call one library function, print
    card, chat, doctor          what the commands call (deploykit/*.py); only the CLI imports them
    serve | sizing | loadtests  serving, sizing and cost, load testing: none imports another
    models                      catalog, hub, store, config, fit, market data
    core                        errors, settings, ports, SLOs: imports nothing of the project
    infra                       deployment files shipped as package data (what serve/deploy copies)
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = (
    "deploykit",
    "deploykit.serve",
    "deploykit.models",
    "deploykit.loadtests",
    "deploykit.sizing",
    "deploykit.infra",
)
COMMAND_MODULES = ("deploykit.card", "deploykit.chat", "deploykit.doctor")
# layer of a module -> the layers it may import (its own always)
ALLOWED = {
    "core": {"core"},
    "models": {"core", "models"},
    "serve": {"core", "models"},
    "sizing": {"core", "models"},
    "loadtests": {"core"},
    "commands": {"core", "models", "serve", "sizing", "loadtests"},
    "cli": {"core", "models", "serve", "sizing", "loadtests", "commands"},
    "package": {"core"},  # deploykit/__init__.py (__version__): every import of a subpackage runs it anyway
    "main": {"cli"},  # python -m deploykit
    "infra": set(),  # deployment files that install with the package; its __init__ imports nothing
}


def layer(module: str) -> str:
    if module == "deploykit":
        return "package"
    if module == "deploykit.__main__":
        return "main"
    if module in COMMAND_MODULES:
        return "commands"
    return module.split(".")[1]


def modules() -> dict[str, Path]:
    """Every module by its installed name, read from wherever the packages are (the repository's folders, or
    a tree laid out as installed)."""
    found = {}
    for package in PACKAGES:
        folder = Path(importlib.util.find_spec(package).origin).parent  # type: ignore[union-attr, arg-type]
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found.setdefault(".".join([package, *parts]), path)
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from deploykit import sizing`
    return {n for n in names if n == "deploykit" or n.startswith("deploykit.")}


MODULES = modules()


def test_every_package_is_found() -> None:
    assert {layer(m) for m in MODULES} == set(ALLOWED)
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module: str) -> None:
    mine = layer(module)
    wrong = []
    for name in sorted(imports(MODULES[module])):
        target = next(
            (m for m in sorted(MODULES, key=len, reverse=True) if name == m or name.startswith(m + ".")), None
        )
        if target is None:
            continue  # `from deploykit.x import name`: counted by its module
        theirs = layer(target)
        if theirs not in (mine, "package") and theirs not in ALLOWED[mine]:
            wrong.append(f"{name} ({theirs})")
    assert not wrong, f"{module} ({mine}) imports {', '.join(wrong)}"
