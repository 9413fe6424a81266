"""Import layering, read with ast: service and model_manager never import each other; sdserve_core imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the top-level packages it must not import (at module level or inside functions).
FORBIDDEN = {
    "service": {"model_manager"},
    "model_manager": {"service"},
    "sdserve_core": {"service", "model_manager"},
}


def imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layers(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {top}"
        for path in files
        for line, top in imported_packages(ast.parse(path.read_text(), str(path)))
        if top in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_relative_imports_stay_inside_their_package() -> None:
    relative = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for package in FORBIDDEN
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.level >= len(path.relative_to(ROOT).parts)
    ]
    assert not relative, "relative imports that leave their package: " + ", ".join(relative)
