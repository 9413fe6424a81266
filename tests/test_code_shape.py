"""Code shape, read with ast: no function is longer than 50 lines and every module has a one-line docstring."""

from __future__ import annotations

import ast
from pathlib import Path

from service.settings import REPO_ROOT

PACKAGES = ("service", "model_manager", "sdserve_core")
MAX_FUNCTION_LINES = 50


def modules() -> list[Path]:
    """Every .py file of the packages, sorted."""
    return sorted(path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))


def parse(path: Path) -> ast.Module:
    """The module's syntax tree."""
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def function_lengths(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(line, name, length) of every function and method, nested ones included; decorators are not counted."""
    return [
        (node.lineno, node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_the_packages_have_modules() -> None:
    found = {path.relative_to(REPO_ROOT).parts[0] for path in modules()}
    assert found == set(PACKAGES)


def test_no_function_is_longer_than_50_lines() -> None:
    too_long = [
        f"{path.relative_to(REPO_ROOT)}:{line} {name} {length}"
        for path in modules()
        for line, name, length in sorted(function_lengths(parse(path)))
        if length > MAX_FUNCTION_LINES
    ]
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_every_module_has_a_docstring_with_a_first_line() -> None:
    missing = []
    for path in modules():
        doc = ast.get_docstring(parse(path), clean=False)
        if not doc or not doc.splitlines()[0].strip():
            missing.append(str(path.relative_to(REPO_ROOT)))
    assert not missing, "modules without a one-line docstring:\n" + "\n".join(missing)
