"""Watchers that come and go, and what a crashing sidecar leaves in its log."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from sdserve.models_client import Snapshot
from tests.model_manager.harness import Sidecar

CYCLES = 150


def test_watchers_that_leave_at_once_never_take_the_sidecar_down(
    tmp_path: Path, sidecars: Callable[..., Sidecar]
) -> None:
    # Reading the caller's address in the stream's cleanup, after the caller had gone, read a call gRPC had
    # already freed: the sidecar died with SIGSEGV on about one watcher in 30-180 on a loaded machine.
    side = sidecars(tmp_path / "store")
    with side.client() as c:
        for _ in range(CYCLES):
            with c.watch() as watch:
                assert isinstance(next(iter(watch)), Snapshot)
            assert side.proc is not None and side.proc.poll() is None
        assert c.list().models == ()
    assert side.wait_until(lambda: sum(r.get("msg") == "watcher left" for r in side.logs()) == CYCLES)
    joined = [str(r["peer"]) for r in side.logs() if r.get("msg") == "watcher subscribed"]
    gone = [str(r["peer"]) for r in side.logs() if r.get("msg") == "watcher left"]
    assert len(joined) == CYCLES and sorted(gone) == sorted(joined)
    assert all(p.startswith("ipv4:127.0.0.1:") for p in gone)


def test_a_native_crash_writes_the_python_stacks_to_the_log(tmp_path: Path, sidecars: Callable[..., Sidecar]) -> None:
    side = sidecars(tmp_path / "store")
    assert side.proc is not None
    side.proc.send_signal(signal.SIGSEGV)
    assert side.proc.wait(60) == -signal.SIGSEGV
    assert side.wait_until(lambda: any("Current thread" in line for line in side.lines))
    text = "".join(side.lines)
    assert "Fatal Python error: Segmentation fault" in text
    assert "sdserve_core/startup.py" in text and "in run_main" in text
