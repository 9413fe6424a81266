"""Servicer code reads the native gRPC call (peer(), auth_context(), peer_identities()...) only while it is live.

grpc.aio's ServicerContext answers these from the C call, which gRPC may free once the caller has gone: reading
one in a stream's cleanup crashed the sidecar with SIGSEGV (the WatchModels 'watcher left' log line). The rule,
read with ast: no such read in a `finally` or `except` block, nor after the first `yield` of an async generator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "model_manager", "sdserve_core")
NATIVE = {"peer", "auth_context", "peer_identities", "peer_identity_key"}


def _native_reads(node: ast.AST) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in NATIVE and not n.args
    ]


def late_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) for each native-call read that may run after the RPC has ended."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for block, why in ((node.finalbody, "in a finally block"), (node.handlers, "in an except block")):
                for stmt in block:
                    found += [(c.lineno, why) for c in _native_reads(stmt)]
        if isinstance(node, ast.AsyncFunctionDef):
            yields = [n.lineno for n in ast.walk(node) if isinstance(n, ast.Yield)]
            late = [c.lineno for c in _native_reads(node) if yields and c.lineno > min(yields)]
            found += [(line, "after the stream's first yield") for line in late]
    return sorted(set(found))


def test_the_rule_finds_the_read_that_crashed() -> None:
    crashed = """
async def WatchModels(self, request, context):
    log.info("watcher subscribed", extra={"peer": context.peer()})
    try:
        yield snapshot
    finally:
        log.info("watcher left", extra={"peer": context.peer()})
"""
    assert late_reads(ast.parse(crashed)) == [(7, "after the stream's first yield"), (7, "in a finally block")]
    fixed = crashed.replace('"peer": context.peer()})\n    try', '"peer": peer})\n    try').replace(
        'watcher left", extra={"peer": context.peer()}', 'watcher left", extra={"peer": peer}'
    )
    assert late_reads(ast.parse(fixed)) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_servicers_read_the_native_call_only_while_it_is_live(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} reads the gRPC call {why}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, why in late_reads(ast.parse(path.read_text(), str(path)))
    ]
    assert not bad, "\n".join(bad)
