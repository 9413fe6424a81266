"""Crash consistency: kill -9 during a pull, crash leftovers, and files corrupted at rest; a restart reconciles."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from model_manager.manifest import read_manifest
from sdserve.errors import SdserveError
from sdserve.models_client import ModelManagerClient, OperationResult
from sdserve_core.manifest import verify
from tests.model_manager.harness import BIG_REPO, TINY_REPO, Sidecar
from tests.model_manager.hubserver import HubServer, Stall


def _published(store: Path) -> list[Path]:
    models = store / "models"
    return sorted(p for p in models.glob("*/*/*") if p.is_dir()) if models.exists() else []


def test_kill_9_during_a_pull_leaves_the_old_state_and_a_restart_reconciles(
    tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    first = sidecars(store, hub_url=hub.url)
    with first.client() as c:
        before = c.pull(TINY_REPO).model
        c.set_alias("default", "tiny-sd")
    name = "unet/diffusion_pytorch_model.safetensors"
    size = len(hub.repos[BIG_REPO].commits[hub.repos[BIG_REPO].refs["main"]][name])
    stall = Stall(name, size - 1024 * 1024)
    hub.stalls.append(stall)

    outcome: list[object] = []

    def pull() -> None:
        try:
            with ModelManagerClient(first.target) as c:
                outcome.append(c.pull(BIG_REPO))
        except SdserveError as err:
            outcome.append(err)

    puller = threading.Thread(target=pull)
    puller.start()
    assert stall.reached.wait(60), "the pull never reached the stall point"
    first.kill()
    puller.join(60)
    assert isinstance(outcome[0], SdserveError) and outcome[0].code == "UNAVAILABLE"

    # On disk: the old model intact, the new one absent, its half-written staging folder left behind.
    assert _published(store) == [Path(before.path)]
    assert verify(Path(before.path), read_manifest(Path(before.path))) == []
    assert any((store / "staging").iterdir()), "kill -9 leaves a staging folder (nothing cleaned it up)"
    assert json.loads((store / "aliases.json").read_text())["default"]["revision"] == before.revision
    # The partial download is a prefix of the file: how much of it reached the disk before the kill is up to the
    # kernel (huggingface_hub writes 10 MiB chunks), so the checks below hold for any length.
    partial = list((store / "downloads").glob("*.part"))
    assert len(partial) == 1 and partial[0].stat().st_size <= stall.at

    # A restart removes the staging leftovers, re-verifies what is published, and keeps the partial download.
    stall.release.set()
    second = sidecars(store, hub_url=hub.url)
    report = next(r for r in second.logs() if r.get("msg") == "store reconciled")
    assert report["staging_removed"] == 1 and report["ready"] == 1 and report["corrupt"] == 0
    assert not any((store / "staging").iterdir())
    kept = partial[0].stat().st_size
    with second.client() as c:
        listing = c.list()
        assert [m.label() for m in listing.models] == [before.label()]
        assert listing.aliases[0].path == before.path
        resumed = c.pull(BIG_REPO)
    assert isinstance(resumed, OperationResult)
    assert resumed.resumed_bytes == kept
    assert hub.ranges(name)[-1] == (f"bytes={kept}-" if kept else "")
    assert verify(Path(resumed.model.path), read_manifest(Path(resumed.model.path))) == []


def test_restart_cleans_leftovers_of_a_crash_at_any_step(
    tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    first = sidecars(store, hub_url=hub.url)
    with first.client() as c:
        model = c.pull(TINY_REPO).model
        c.set_alias("default", "tiny-sd")
    first.kill()
    # What a crash can leave: a staging folder mid-copy, a folder renamed away for deletion, half-written
    # aliases.json / state.json temporaries, a partial download, and empty parent folders of a removal.
    (store / "staging" / "tiny-sd-abc123" / "unet").mkdir(parents=True)
    (store / "staging" / "tiny-sd-abc123" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (store / "staging" / ".trash-xyz").mkdir()
    (store / ".aliases.json.tmp-123").write_text('{"default": ')
    (store / ".state.json.tmp-123").write_text("{")
    (store / "models" / "gone" / "0123456789abcdef").mkdir(parents=True)
    aliases_before = (store / "aliases.json").read_text()

    second = sidecars(store, hub_url=hub.url)
    assert sorted(p.name for p in (store / "staging").iterdir()) == []
    assert not list(store.glob(".*.tmp-*"))
    assert not (store / "models" / "gone").exists()
    assert (store / "aliases.json").read_text() == aliases_before
    with second.client() as c:
        listing = c.list()
    assert [m.label() for m in listing.models] == [model.label()]
    assert listing.models[0].state == "ready" and listing.models[0].aliases == ("default",)


def test_a_file_corrupted_at_rest_is_found_at_restart_and_repaired_by_a_pull(
    tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    first = sidecars(store, hub_url=hub.url)
    with first.client() as c:
        model = c.pull(TINY_REPO).model
    first.stop()
    weights = Path(model.path) / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    second = sidecars(store, hub_url=hub.url)
    with second.client() as c:
        (stored,) = c.list().models
        assert stored.state == "corrupt"
        assert "vae/diffusion_pytorch_model.safetensors" in stored.error and "sha256" in stored.error
        with pytest.raises(SdserveError) as err:
            c.set_alias("default", "tiny-sd")
        assert err.value.code == "FAILED_PRECONDITION" and "corrupt" in err.value.message
        repaired = c.pull(TINY_REPO)
        assert repaired.model.state == "ready" and repaired.model.path == model.path
    assert verify(Path(model.path), read_manifest(Path(model.path))) == []

    # A truncated file is caught by the cheaper size check as well.
    second.stop()
    weights.write_bytes(weights.read_bytes()[:100])
    third = sidecars(store, hub_url=hub.url, args=["--verify-on-start", "size"])
    with third.client() as c:
        (stored,) = c.list().models
    assert stored.state == "corrupt" and "truncated" in stored.error


def test_a_second_sidecar_cannot_share_the_store(tmp_path: Path, sidecars: Callable[..., Sidecar]) -> None:
    store = tmp_path / "store"
    sidecars(store)
    with pytest.raises(RuntimeError) as err:
        sidecars(store)
    assert "another model manager holds the store" in str(err.value)
