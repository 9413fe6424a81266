"""The Go client (clients/go) against a live sdserve: exact bytes, progress, cancel, deadline, errors, SDXL,
adapters."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.clients.live import INSTALL_HINT, REPO, SHAPES_LORA, LiveServer, require_tool, run_checked

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
# Run by test_go_sdxl with the SDXL reference; they skip without it.
SDXL_TESTS = ["TestLiveSDXLRefiner", "TestLiveSDXLModels", "TestLiveSDXLMemoryPolicy"]
# Run by test_go_adapters with the adapter reference; they skip without it (the LoRA one also without the LoRA).
ADAPTER_TESTS = ["TestLiveAdapterNotFound", "TestLiveAdapterLoRA"]


@pytest.fixture(scope="module")
def go_env() -> tuple[str, dict[str, str]]:
    """The go binary and an offline module-mode environment, after vendoring and `go vet`."""
    go = require_tool("go")
    for module in ("google.golang.org/grpc", "google.golang.org/protobuf", "google.golang.org/genproto"):
        if not (GOCODE / module).is_dir():
            pytest.fail(f"{GOCODE / module} is missing: {INSTALL_HINT}")
    # vendor/ is a tree of symlinks into Debian's Go sources, so everything builds offline in module mode.
    run_checked([str(GO_DIR / "vendor-debian.sh")], cwd=GO_DIR)
    env = dict(os.environ, GOFLAGS="-mod=vendor", GOPROXY="off", GO111MODULE="on", GOTOOLCHAIN="local")
    run_checked([go, "vet", "./..."], cwd=GO_DIR, env=env)
    return go, env


def _passed(out: str) -> set[str]:
    return set(re.findall(r"^\s*--- PASS: (\w+)", out, re.MULTILINE))


def _skipped(out: str) -> set[str]:
    return set(re.findall(r"^\s*--- SKIP: (\w+)", out, re.MULTILINE))


def test_go_client(go_env: tuple[str, dict[str, str]], live_server: LiveServer, reference_cases: Path) -> None:
    go, base = go_env
    env = dict(base, SDSERVE_ADDR=live_server.address, SDSERVE_CASES=str(reference_cases))
    env.pop("SDSERVE_SDXL_CASES", None)
    env.pop("SDSERVE_ADAPTER_CASES", None)
    out = run_checked([go, "test", "-count=1", "-v", "-timeout=240s", "./..."], cwd=GO_DIR, env=env, timeout=360)
    missing = [name for name in LIVE_TESTS if name not in _passed(out)]
    skipped = _skipped(out)
    assert not missing and skipped <= {*SDXL_TESTS, *ADAPTER_TESTS}, f"live Go tests not passed: {missing}\n{out}"
    live_server.assert_alive()


def test_go_sdxl(go_env: tuple[str, dict[str, str]], live_server: LiveServer, sdxl_cases: Path) -> None:
    """prompt_2, micro-conditioning and a refiner pass from Go: the Python stubs' bytes and passes."""
    go, base = go_env
    env = dict(base, SDSERVE_ADDR=live_server.address, SDSERVE_SDXL_CASES=str(sdxl_cases))
    cmd = [go, "test", "-count=1", "-v", "-timeout=240s", "-run", "^TestLiveSDXL", "./sdserve/"]
    out = run_checked(cmd, cwd=GO_DIR, env=env, timeout=360)
    missing = [name for name in SDXL_TESTS if name not in _passed(out)]
    assert not missing and "--- SKIP" not in out, f"live Go SDXL tests not passed: {missing}\n{out}"
    live_server.assert_alive()


def test_go_adapters(go_env: tuple[str, dict[str, str]], live_server: LiveServer, adapter_cases: Path) -> None:
    """Adapters from Go: an unknown one is NOT_FOUND naming its field; the shapes LoRA (when the checkout ships it)
    gives the Python stubs' bytes and resolved adapters."""
    go, base = go_env
    env = dict(base, SDSERVE_ADDR=live_server.address, SDSERVE_ADAPTER_CASES=str(adapter_cases))
    cmd = [go, "test", "-count=1", "-v", "-timeout=240s", "-run", "^TestLiveAdapter", "./sdserve/"]
    out = run_checked(cmd, cwd=GO_DIR, env=env, timeout=360)
    expected = ADAPTER_TESTS if SHAPES_LORA.is_dir() else ADAPTER_TESTS[:1]
    missing = [name for name in expected if name not in _passed(out)]
    assert not missing and _skipped(out) <= set(ADAPTER_TESTS) - set(expected), f"Go adapter tests: {missing}\n{out}"
    live_server.assert_alive()
