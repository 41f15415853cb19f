"""The package rules of docs/architecture.md, checked on the source: dependencies point down."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "metergate"
# The doors and the command line sit on top; nothing else may import them.
TOP = {"api", "cli", "__main__"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _package(path: Path) -> str:
    relative = path.relative_to(SRC)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_nothing_below_the_doors_imports_them():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if _package(path) in TOP:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "metergate" and len(parts) > 1 and parts[1] in TOP:
                offenders.append(f"{path.relative_to(SRC)} imports {module}")
    assert offenders == []


def test_error_kinds_are_a_leaf():
    """Every package raises `metergate.errors` kinds, so that module imports none of them."""
    imported = _imports(SRC / "errors.py")
    assert not [m for m in imported if m.split(".")[0] == "metergate"]
