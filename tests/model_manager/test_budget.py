"""Disk budget: least-recently-used eviction of unprotected models, clean refusal, and a real full disk (tmpfs)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sdserve.errors import SdserveError
from sdserve.models_client import ModelPublished, ModelRemoved, OperationResult, Snapshot
from tests.model_manager.harness import BIG_REPO, TINY_REPO, Sidecar
from tests.model_manager.hubserver import HubServer, Stall

MIB = 1024 * 1024


def _leftovers(store: Path) -> list[str]:
    staging = [p.name for p in (store / "staging").iterdir()]
    partials = [p.name for p in (store / "downloads").glob("*.part")]
    return staging + partials


def test_lru_eviction_spares_pinned_and_aliased_models(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    size = sum(p.stat().st_size for p in (tiny_root / "tiny-sd").rglob("*") if p.is_file())
    # Room for two copies of the tiny model, not three.
    side = sidecars(store, import_roots=[tiny_root], args=["--max-store-bytes", str(int(size * 2.5))])
    folder = str(tiny_root / "tiny-sd")
    with side.client() as c:
        a = c.import_model(folder, name="a").model
        b = c.import_model(folder, name="b").model
        c.record_use("a", a.revision, "fp32")  # now b is the least recently used
        with c.watch() as watch:
            events = iter(watch)
            assert isinstance(next(events), Snapshot)
            third = c.import_model(folder, name="c")
            assert [m.label() for m in third.evicted] == [b.label()]
            removed = next(events)
            assert isinstance(removed, ModelRemoved) and removed.reason == "evicted"
            assert removed.model.label() == b.label()
            published = next(events)
            assert isinstance(published, ModelPublished) and published.model.name == "c"
        assert sorted(m.name for m in c.list().models) == ["a", "c"]
        assert not Path(b.path).exists()

        # a is pinned and c is aliased: nothing may be evicted, so the import fails and leaves nothing behind.
        c.pin("a")
        c.set_alias("prod", "c")
        with pytest.raises(SdserveError) as err:
            c.import_model(folder, name="d")
        assert err.value.code == "RESOURCE_EXHAUSTED"
        assert "budget" in err.value.message and "pinned, aliased or in-use" in err.value.message
        assert sorted(m.name for m in c.list().models) == ["a", "c"]
        assert not (store / "models" / "d").exists()
        assert _leftovers(store) == []

        # Unpinned, a is the one to go.
        c.pin("a", False)
        result: OperationResult = c.import_model(folder, name="d")
        assert [m.name for m in result.evicted] == ["a"]
        usage = c.list().usage
    assert usage.used_bytes <= usage.budget_bytes
    assert sorted(p.name for p in (store / "models").iterdir()) == ["c", "d"]


def test_a_pull_that_cannot_fit_the_budget_fails_before_downloading(
    tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    side = sidecars(store, hub_url=hub.url, args=["--max-store-bytes", "4M"])
    with side.client() as c, pytest.raises(SdserveError) as err:
        c.pull(TINY_REPO)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    assert "needs" in err.value.message and "4.0 MiB" in err.value.message
    assert not [p for m, p, _ in hub.requests if "/resolve/" in p], "nothing was downloaded"
    assert _leftovers(store) == []


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"], capture_output=True, check=False
    )
    return done.returncode == 0


def _on_tmpfs(store: Path, size: str) -> list[str]:
    """A wrapper that starts the sidecar in its own mount namespace with a `size` tmpfs mounted on the store."""
    store.mkdir(parents=True)
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"', str(store)]


def test_disk_full_on_a_small_tmpfs(tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]) -> None:
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs `unshare -m` and permission to mount a tmpfs")
    store = tmp_path / "store"
    side = sidecars(store, hub_url=hub.url, wrapper=_on_tmpfs(store, "9m"))
    assert side.proc is not None
    inside = Path(f"/proc/{side.proc.pid}/root") / str(store).lstrip("/")  # the store as the sidecar sees it

    # More than the disk holds: refused before any byte is written.
    with side.client() as c, pytest.raises(SdserveError) as err:
        c.pull(BIG_REPO)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "free" in err.value.message
    assert _leftovers(inside) == []

    # It fits when it starts, but the disk fills up during the transfer.
    stall = Stall("unet/diffusion_pytorch_model.safetensors", 1024)
    hub.stalls.append(stall)
    failure: list[SdserveError] = []

    def pull() -> None:
        with side.client() as c:
            try:
                c.pull(TINY_REPO)
            except SdserveError as e:
                failure.append(e)

    puller = threading.Thread(target=pull)
    puller.start()
    assert stall.reached.wait(60)
    filler = inside / "filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * MIB)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    stall.release.set()
    puller.join(60)
    assert failure and failure[0].code == "RESOURCE_EXHAUSTED", failure
    assert "filled up" in failure[0].message
    assert _leftovers(inside) == []
    assert not (inside / "models").exists() or not any((inside / "models").iterdir())

    # With room again, the same pull succeeds.
    filler.unlink()
    with side.client() as c:
        assert c.pull(TINY_REPO).model.state == "ready"
