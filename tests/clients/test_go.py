"""The Go client (clients/go) against a live sdserve: exact bytes, progress, cancel, deadline, errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.clients.live import INSTALL_HINT, REPO, LiveServer, require_tool, run_checked

GO_DIR = REPO / "clients" / "go"
GOCODE = Path("/usr/share/gocode/src")
LIVE_TESTS = [
    "TestLiveExactBytes",
    "TestLiveProgressInOrder",
    "TestLiveCancelMidStream",
    "TestLiveDeadline",
    "TestLiveInvalidArgument",
    "TestLiveInfo",
]


def test_go_client(live_server: LiveServer, reference_cases: Path) -> None:
    go = require_tool("go")
    for module in ("google.golang.org/grpc", "google.golang.org/protobuf", "google.golang.org/genproto"):
        if not (GOCODE / module).is_dir():
            pytest.fail(f"{GOCODE / module} is missing: {INSTALL_HINT}")
    # vendor/ is a tree of symlinks into Debian's Go sources, so everything builds offline in module mode.
    run_checked([str(GO_DIR / "vendor-debian.sh")], cwd=GO_DIR)
    env = dict(os.environ, GOFLAGS="-mod=vendor", GOPROXY="off", GO111MODULE="on", GOTOOLCHAIN="local")
    run_checked([go, "vet", "./..."], cwd=GO_DIR, env=env)
    env.update(SDSERVE_ADDR=live_server.address, SDSERVE_CASES=str(reference_cases))
    out = run_checked([go, "test", "-count=1", "-v", "-timeout=240s", "./..."], cwd=GO_DIR, env=env, timeout=360)
    passed = set(re.findall(r"^\s*--- PASS: (\w+)", out, re.MULTILINE))
    missing = [name for name in LIVE_TESTS if name not in passed]
    assert not missing and "--- SKIP" not in out, f"live Go tests not passed: {missing}\n{out}"
    live_server.assert_alive()
