"""The TypeScript client (clients/typescript) against a live sdserve: exact bytes, progress, cancel, errors."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.clients.live import INSTALL_HINT, REPO, LiveServer, require_tool, run_checked

TS_DIR = REPO / "clients" / "typescript"
MIN_PASSES = 9  # test() calls in clients/typescript/test/*.test.ts: 7 live, 2 unit


def test_typescript_client(live_server: LiveServer, reference_cases: Path) -> None:
    node = require_tool("node")
    tsc = TS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.exists():
        pytest.fail(f"{TS_DIR / 'node_modules'} is missing or incomplete: {INSTALL_HINT}")
    shutil.rmtree(TS_DIR / "dist", ignore_errors=True)  # no stale compiled tests
    run_checked([node, str(tsc), "-p", "tsconfig.json"], cwd=TS_DIR)
    env = dict(os.environ, SDSERVE_ADDR=live_server.address, SDSERVE_CASES=str(reference_cases))
    out = run_checked([node, "--test", "--test-reporter=tap", "dist/test/"], cwd=TS_DIR, env=env, timeout=300)
    summary = re.findall(r"^# (tests|pass|fail|skipped|todo|cancelled) (\d+)$", out, re.MULTILINE)
    counts = {key: int(value) for key, value in summary}
    assert counts.get("pass", 0) >= MIN_PASSES and counts.get("pass") == counts.get("tests"), out
    live_server.assert_alive()
