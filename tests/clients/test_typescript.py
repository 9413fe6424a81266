"""The TypeScript client (clients/typescript) against a live sdserve: exact bytes, progress, cancel, errors, SDXL,
adapters."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.clients.live import INSTALL_HINT, REPO, SHAPES_LORA, LiveServer, require_tool, run_checked

TS_DIR = REPO / "clients" / "typescript"
SDXL_FILE = "sdxl_live.test.js"  # run by test_typescript_sdxl, with the SDXL reference
ADAPTERS_FILE = "adapters_live.test.js"  # run by test_typescript_adapters, with the adapter reference
MIN_PASSES = 17  # test() calls in clients/typescript/test/*.test.ts but SDXL_FILE and ADAPTERS_FILE: 7 live, 10 unit
SDXL_PASSES = 3  # test() calls in test/sdxl_live.test.ts
ADAPTER_TESTS = 2  # test() calls in test/adapters_live.test.ts; the LoRA one skips without models/adapters/...


@pytest.fixture(scope="module")
def compiled() -> str:
    """Compiles the client and its tests with tsc once for this module; returns the node binary."""
    node = require_tool("node")
    tsc = TS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.exists():
        pytest.fail(f"{TS_DIR / 'node_modules'} is missing or incomplete: {INSTALL_HINT}")
    shutil.rmtree(TS_DIR / "dist", ignore_errors=True)  # no stale compiled tests
    run_checked([node, str(tsc), "-p", "tsconfig.json"], cwd=TS_DIR)
    return node


def _node_test(node: str, files: list[str], env: dict[str, str], minimum: int, skipped: int = 0) -> str:
    """Runs `node --test` on compiled test files; every test but `skipped` must pass, and at least `minimum`."""
    out = run_checked([node, "--test", "--test-reporter=tap", *files], cwd=TS_DIR, env=env, timeout=300)
    summary = re.findall(r"^# (tests|pass|fail|skipped|todo|cancelled) (\d+)$", out, re.MULTILINE)
    counts = {key: int(value) for key, value in summary}
    assert counts.get("pass", 0) >= minimum and counts.get("pass", 0) + skipped == counts.get("tests"), out
    assert counts.get("skipped", 0) == skipped, out
    return out


def test_typescript_client(compiled: str, live_server: LiveServer, reference_cases: Path) -> None:
    files = sorted(str(p.relative_to(TS_DIR)) for p in (TS_DIR / "dist" / "test").glob("*.test.js"))
    files = [f for f in files if not f.endswith((SDXL_FILE, ADAPTERS_FILE))]
    env = dict(os.environ, SDSERVE_ADDR=live_server.address, SDSERVE_CASES=str(reference_cases))
    _node_test(compiled, files, env, MIN_PASSES)
    live_server.assert_alive()


def test_typescript_sdxl(compiled: str, live_server: LiveServer, sdxl_cases: Path) -> None:
    """prompt2, micro-conditioning and a refiner pass from TypeScript: the Python stubs' bytes and passes."""
    env = dict(os.environ, SDSERVE_ADDR=live_server.address, SDSERVE_SDXL_CASES=str(sdxl_cases))
    _node_test(compiled, [f"dist/test/{SDXL_FILE}"], env, SDXL_PASSES)
    live_server.assert_alive()


def test_typescript_adapters(compiled: str, live_server: LiveServer, adapter_cases: Path) -> None:
    """Adapters from TypeScript: an unknown one is NOT_FOUND naming its field; the shapes LoRA (when the checkout
    ships it) gives the Python stubs' bytes and resolved adapters, else that test skips."""
    env = dict(os.environ, SDSERVE_ADDR=live_server.address, SDSERVE_ADAPTER_CASES=str(adapter_cases))
    skipped = 0 if SHAPES_LORA.is_dir() else 1
    _node_test(compiled, [f"dist/test/{ADAPTERS_FILE}"], env, ADAPTER_TESTS - skipped, skipped)
    live_server.assert_alive()
