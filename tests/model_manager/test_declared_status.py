"""The declared state's progress and drift over the API and in `sdserve models list/show`: a broken entry shows as
failed with its reason until the file is fixed, then the state is converged; `show` lists a model's own entries."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sdserve import models_cli
from tests.harness import wait_until
from tests.model_manager.harness import Sidecar
from tests.model_manager.test_declared import ConfigMapVolume, _local, _yaml, passes


def test_list_and_show_report_the_declared_state(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar], capsys: pytest.CaptureFixture[str]
) -> None:
    volume = ConfigMapVolume(tmp_path / "declared")
    good = _local("a", tiny_root / "tiny-sd")
    outside = _local("gone", tmp_path / "elsewhere" / "tiny-sd")
    volume.write(_yaml([good, outside], {"default": "a"}))
    started = time.time()
    flags = ["--declared-state", str(volume.path), "--declared-poll-seconds", "0.1", "--quality-check", "false"]
    car = sidecars(tmp_path / "store", import_roots=[tiny_root], args=flags)
    wait_until(lambda: len(passes(car)) == 1, "the first pass to end", timeout=120)

    with car.client() as c:
        listing = c.list()
    d = listing.declared
    assert d is not None and d.path == str(volume.path) and len(d.sha256) == 64
    assert not d.converged and not d.running and not d.file_error
    assert d.last_pass_at >= started and d.last_success_at == 0.0
    states = {e.entry: (e.name, e.state) for e in d.entries}
    assert states == {
        "models[0]": ("a", "ready"),
        "models[1]": ("gone", "failed"),
        "aliases.default": ("default", "ready"),
    }
    failed = next(e for e in d.entries if e.state == "failed")
    assert str(tmp_path / "elsewhere") in failed.reason, failed.reason
    assert not listing.usage.read_only

    def cli(*argv: str) -> str:
        capsys.readouterr()
        assert models_cli.main([*argv, "--manager", car.target]) == 0
        return capsys.readouterr().out

    out = cli("list")
    assert f"declared state {volume.path}: not converged, 2 of 3 entries ready" in out
    assert f"  failed  models[1] gone: {failed.reason}" in out
    out = cli("show", "a")
    lines = out.split("declared\n")[1].splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["ready", "models[0]", "a"],
        ["ready", "aliases.default", "default"],
    ]

    # The file is fixed: the next pass converges, and `list` says so with no entry left to report.
    volume.write(_yaml([good], {"default": "a"}))
    wait_until(lambda: len(passes(car)) == 2, "the second pass to end")
    with car.client() as c:
        d = c.list().declared
        details = c.get("a")
    assert d is not None and d.converged and d.last_success_at >= d.last_pass_at - 1
    assert [(e.entry, e.state) for e in details.declared] == [("models[0]", "ready"), ("aliases.default", "ready")]
    out = cli("list")
    assert "converged, 2 of 2 entries ready" in out and "  failed" not in out
