"""Integrity with a real server following a real sidecar: a failed hot swap moves the alias back in every process and
across restarts, a target that turns corrupt stops being served, and eviction spares what the server has loaded."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from sdserve import Client
from sdserve.errors import SdserveError
from sdserve.models_client import AliasSet, ModelCorrupted, Snapshot
from service.models import ModelState
from service.tiny import build_tiny
from tests.harness import ServerThread, serving
from tests.model_manager.harness import Sidecar
from tests.model_manager.test_integrity import UNET, flip, next_of
from tests.test_hotswap import SwapWatch, served_revision


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a, b and c (tiny models with different weights) and `broken`: a's files with a UNet config that does not fit
    its weights, so its files match their manifest but no loader can build it."""
    root = tmp_path_factory.mktemp("integrity-sources")
    build_tiny(root / "a", seed=0)
    build_tiny(root / "b", seed=5)
    build_tiny(root / "c", seed=9)
    shutil.copytree(root / "a", root / "broken")
    config = json.loads((root / "broken" / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * n for n in config["block_out_channels"]]
    (root / "broken" / "unet" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture()
def sidecar(tmp_path: Path, sources: Path) -> Iterator[Sidecar]:
    car = Sidecar(tmp_path / "store", import_roots=[sources], args=["--scrub-interval-seconds", "0.5"]).start()
    try:
        yield car
    finally:
        car.stop()


def follower(models_dir: Path, car: Sidecar, **overrides: Any) -> AbstractContextManager[ServerThread]:
    """A real server following `car` (batch calibration off: it only costs start-up time here)."""
    return serving(models_dir, calibrate_batching=False, manager_target=car.target, **overrides)


def imported(car: Sidecar, sources: Path, name: str) -> tuple[str, str]:
    """Imports sources/NAME; returns (revision, folder)."""
    with car.client() as mc:
        model = mc.import_model(str(sources / name), name=name).model
    return model.revision, model.path


class LeaseWatch:
    """Wakes the test on each lease renewal the server's watcher makes (its leases_changed condition, not a timer)."""

    def __init__(self, server: ServerThread):
        assert server.server is not None and server.server.watcher is not None
        self.watcher = server.server.watcher
        self.cond: threading.Condition = self.watcher.leases_changed

    def wait_for(self, predicate: object, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout)  # type: ignore[arg-type]


def test_a_failed_swap_moves_the_alias_back_in_every_process_and_across_restarts(
    sidecar: Sidecar, sources: Path, models_dir: Path
) -> None:
    rev_a, _ = imported(sidecar, sources, "a")
    imported(sidecar, sources, "broken")
    with sidecar.client() as mc:
        mc.set_alias("prod", "a")
    with follower(models_dir, sidecar, default_model="prod") as srv, Client(srv.target) as c:
        swaps = SwapWatch(srv)
        assert served_revision(c) == rev_a
        with sidecar.client() as mc, mc.watch() as watch:
            events = iter(watch)
            assert isinstance(next(events), Snapshot)
            # Its files match the manifest, so the sidecar moves the alias; only the server's load fails.
            mc.set_alias("prod", "broken")
            assert swaps.wait(1) == [False]
            moved = next_of(events, AliasSet)  # the set itself
            moved = next_of(events, AliasSet)  # the server's report moved it back
            assert isinstance(moved, AliasSet) and moved.reverted and moved.alias.model == "a"
            assert "could not load" in moved.reason
            (alias,) = mc.list().aliases
        assert served_revision(c) == rev_a
        assert (alias.model, alias.revision) == ("a", rev_a)
        failure = alias.last_failure
        assert failure is not None and failure.target.name == "broken" and failure.reporter == "server"
        assert failure.reverted and failure.reason.startswith("a server could not load it: "), failure.reason
    assert json.loads((sidecar.store / "aliases.json").read_text())["prod"]["model"] == "a"

    # Restarts of both agree: the alias serves its last good target, and the failure stays on record.
    sidecar.stop()
    sidecar.start()
    with sidecar.client() as mc:
        (alias,) = mc.list().aliases
    assert alias.model == "a" and alias.last_failure is not None and alias.last_failure.target.name == "broken"
    with follower(models_dir, sidecar, default_model="prod") as srv, Client(srv.target) as c:
        assert served_revision(c) == rev_a


def test_an_alias_whose_target_turns_corrupt_goes_back_and_the_corrupt_weights_are_dropped(
    sidecar: Sidecar, sources: Path, models_dir: Path
) -> None:
    rev_a, _ = imported(sidecar, sources, "a")
    rev_b, path_b = imported(sidecar, sources, "b")
    with sidecar.client() as mc:
        mc.set_alias("prod", "a")
        mc.set_alias("prod", "b")
    with follower(models_dir, sidecar, default_model="prod") as srv, Client(srv.target) as c:
        assert srv.server is not None
        registry = srv.server.registry
        swaps, leases = SwapWatch(srv), LeaseWatch(srv)
        assert served_revision(c) == rev_b
        slot_b = registry.slot_of("prod")
        assert slot_b is not None
        flip(Path(path_b) / UNET, -1000)  # a weight, not the header: loadable, wrong; the scrub finds it
        assert swaps.wait(1) == [True]
        # Once the watcher has applied the events (each ends with a lease renewal), b is gone by every name.
        leases.wait_for(lambda: all(e.slot != slot_b for e in registry.entries()))
        assert served_revision(c) == rev_a
        with pytest.raises(SdserveError) as err:
            c.generate("x", model="b", steps=2, seed=1)
        assert err.value.code == "NOT_FOUND"


def test_an_alias_with_nothing_to_go_back_to_refuses_to_serve_its_corrupt_target(
    sidecar: Sidecar, sources: Path, models_dir: Path
) -> None:
    """Needs the server's loader to verify files before loading (service.models calls verify_folder)."""
    rev_c, path_c = imported(sidecar, sources, "c")
    with sidecar.client() as mc:
        mc.set_alias("solo", "c")
    with follower(models_dir, sidecar) as srv, Client(srv.target) as c:
        assert srv.server is not None
        registry = srv.server.registry
        leases = LeaseWatch(srv)
        assert served_revision(c, model="solo") == rev_c
        slot_c = registry.slot_of("solo")
        assert slot_c is not None and registry.state(slot_c)[0] is ModelState.LOADED
        with sidecar.client() as mc, mc.watch() as watch:
            events = iter(watch)
            flip(Path(path_c) / UNET, -1000)
            assert isinstance(next_of(events, ModelCorrupted), ModelCorrupted)
        # The server drops the weights at once (each event it applies ends with a lease renewal).
        leases.wait_for(lambda: registry.state(slot_c)[0] is not ModelState.LOADED)
        for _ in range(2):
            with pytest.raises(SdserveError) as err:
                c.generate("x", model="solo", steps=2, seed=1)
            assert err.value.code == "FAILED_PRECONDITION", err.value
            assert UNET in err.value.message, err.value.message
        with sidecar.client() as mc:
            (alias,) = mc.list().aliases
        assert alias.model == "c" and alias.last_failure is not None and UNET in alias.last_failure.reason


def test_eviction_spares_what_the_server_has_loaded(tmp_path: Path, sources: Path, models_dir: Path) -> None:
    size = sum(p.stat().st_size for p in (sources / "a").rglob("*") if p.is_file())
    budget = ["--max-store-bytes", str(int(size * 2.5))]  # room for two models, not three
    car = Sidecar(tmp_path / "store", import_roots=[sources], args=budget).start()
    try:
        rev_a, _ = imported(car, sources, "a")
        rev_b, _ = imported(car, sources, "b")
        with follower(models_dir, car) as srv, Client(srv.target) as client:
            assert srv.server is not None
            leases = LeaseWatch(srv)
            assert served_revision(client, model="a") == rev_a
            leases.wait_for(lambda: f"a@{rev_a}:fp32" in leases.watcher.leased)
            with car.client() as mc:
                mc.record_use("b", rev_b, "fp32")  # a is now the least recently used
                (a,) = mc.list("a").models
                assert a.lease_holders == 1
                result = mc.import_model(str(sources / "c"), name="c")
                assert [m.name for m in result.evicted] == ["b"], "the loaded a must not be evicted"
            assert served_revision(client, model="a") == rev_a
            # With c loaded as well, nothing may be evicted.
            rev_c = result.model.revision
            served_revision(client, model="c")
            leases.wait_for(lambda: f"c@{rev_c}:fp32" in leases.watcher.leased)
            with car.client() as mc, pytest.raises(SdserveError) as err:
                mc.import_model(str(sources / "b"), name="b2")
            assert err.value.code == "RESOURCE_EXHAUSTED" and "loaded by a server" in err.value.message
            assert served_revision(client, model="a") == rev_a
    finally:
        car.stop()
