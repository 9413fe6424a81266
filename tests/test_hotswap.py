"""Server side of hot swap: the server follows the model-manager sidecar, swaps aliases under load with
zero failed requests, releases the old model, keeps serving through a bad swap and a sidecar crash."""

from __future__ import annotations

import gc
import json
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import Client, SdserveError
from service.models import ModelState
from service.requests import Task
from service.tiny import build_tiny
from tests.harness import ServerThread, serving
from tests.model_manager.harness import Sidecar


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swap-sources")
    build_tiny(root / "a", seed=0)
    build_tiny(root / "b", seed=5)
    build_tiny(root / "c", seed=9)
    return root


@pytest.fixture()
def sidecar(tmp_path: Path, sources: Path) -> Iterator[Sidecar]:
    car = Sidecar(tmp_path / "store", import_roots=[sources]).start()
    try:
        yield car
    finally:
        car.stop()


def imported(car: Sidecar, sources: Path, name: str) -> str:
    """Imports sources/NAME into the store; returns its revision."""
    with car.client() as mc:
        result = mc.import_model(str(sources / name), name=name)
    return result.model.revision if result.model is not None else ""


class SwapWatch:
    """The hot swaps the server reports (to the test's recorder) from now on, ok or failed."""

    def __init__(self, server: ServerThread):
        self.recorder = server.recorder
        with self.recorder.cond:
            self.base = len(self.recorder.swaps)

    def wait(self, count: int, timeout: float = 120) -> list[bool]:
        return self.recorder.wait_swaps(self.base + count, timeout)[self.base :]


def served_revision(client: Client, model: str = "prod") -> str:
    return str(client.generate("x", model=model, steps=2, seed=1).parameters["model_revision"])


def test_swap_under_load_has_no_failures_and_releases_the_old_model(
    sidecar: Sidecar, sources: Path, models_dir: Path
) -> None:
    rev_a, rev_b = imported(sidecar, sources, "a"), imported(sidecar, sources, "b")
    with sidecar.client() as mc:
        mc.set_alias("prod", "a")
    with serving(models_dir, manager_target=sidecar.target, default_model="prod") as srv:
        assert srv.server is not None
        registry = srv.server.registry
        swaps = SwapWatch(srv)
        with Client(srv.target) as c:
            assert served_revision(c) == rev_a
            old = registry.get_loaded(registry.lookup("prod", Task.GENERATE))
            old_unet = weakref.ref(old.components.unet)
            old_slot = old.entry.slot
            del old
            stop = threading.Event()
            seen: list[str] = []
            failures: list[BaseException] = []
            progress = threading.Condition()

            def load() -> None:
                while not stop.is_set():
                    try:
                        revision = served_revision(c)
                    except BaseException as exc:
                        failures.append(exc)
                        revision = ""
                    with progress:
                        if revision:
                            seen.append(revision)
                        progress.notify_all()
                    if not revision:
                        return

            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            with sidecar.client() as mc:
                mc.set_alias("prod", "b")
                assert swaps.wait(1) == [True]
                after_first = len(seen)
                mc.set_alias("prod", "a")
                assert swaps.wait(2) == [True, True]
                mc.set_alias("prod", "b")
                assert swaps.wait(3) == [True, True, True]
            # Keep the load on until requests after the last swap have completed.
            with progress:
                assert progress.wait_for(lambda: len(seen) >= after_first + 6 or bool(failures), 120)
            stop.set()
            for t in threads:
                t.join(60)
            assert not failures, failures
            assert set(seen) <= {rev_a, rev_b} and rev_b in seen
            assert served_revision(c) == rev_b
        gc.collect()
        # The first model (a, loaded again by the second swap, then swapped out) is unloaded and freed.
        assert old_unet() is None
        assert registry.state(old_slot)[0] is ModelState.ON_DISK


def test_swap_to_a_broken_model_keeps_the_old_one(sidecar: Sidecar, sources: Path, models_dir: Path) -> None:
    rev_a = imported(sidecar, sources, "a")
    # Files that match their manifest (the sidecar verifies those before an alias moves) but cannot be loaded:
    # a UNet config that does not fit the weights.
    broken = sources / "c-broken"
    if not broken.exists():
        shutil.copytree(sources / "c", broken)
        config = json.loads((broken / "unet" / "config.json").read_text())
        config["block_out_channels"] = [2 * n for n in config["block_out_channels"]]
        (broken / "unet" / "config.json").write_text(json.dumps(config))
    with sidecar.client() as mc:
        mc.import_model(str(broken), name="c")
        mc.set_alias("prod", "a")
    with serving(models_dir, manager_target=sidecar.target, default_model="prod") as srv:
        swaps = SwapWatch(srv)
        with Client(srv.target) as c:
            assert served_revision(c) == rev_a
            with sidecar.client() as mc:
                try:
                    mc.set_alias("prod", "c")
                except SdserveError:
                    pytest.fail("the sidecar refused the alias; the server side is what this test checks")
            assert swaps.wait(1) == [False]
            assert served_revision(c) == rev_a
            models, _ = c.list_models()
            failed = [m for m in models if m.name.startswith("c@")]
            assert failed and failed[0].state == "failed" and failed[0].error


def test_sidecar_crash_keeps_serving_and_resubscribes(sidecar: Sidecar, sources: Path, models_dir: Path) -> None:
    rev_a, rev_b = imported(sidecar, sources, "a"), imported(sidecar, sources, "b")
    with sidecar.client() as mc:
        mc.set_alias("prod", "a")
    with serving(models_dir, manager_target=sidecar.target, default_model="prod") as srv:
        assert srv.server is not None and srv.server.watcher is not None
        watcher = srv.server.watcher
        swaps = SwapWatch(srv)
        with Client(srv.target) as c:
            assert served_revision(c) == rev_a
            first_instance = watcher.instance_id
            sidecar.kill()
            # Serving goes on without the sidecar.
            assert served_revision(c) == rev_a
            port = sidecar.port
            sidecar.args = (*sidecar.args, "--port", str(port))
            sidecar.start()
            with sidecar.client() as mc:
                mc.set_alias("prod", "b")
            assert swaps.wait(1) == [True]
            assert watcher.instance_id != first_instance
            assert served_revision(c) == rev_b


def test_loading_a_stored_model_reports_its_use_to_the_sidecar(
    sidecar: Sidecar, sources: Path, models_dir: Path
) -> None:
    """A stored variant the server loads gets a fresh last-used time in the sidecar (RecordModelUse), so
    least-recently-used eviction sees what is being served."""
    rev_a = imported(sidecar, sources, "a")
    with sidecar.client() as mc:
        (before,) = mc.get("a").variants
    with serving(models_dir, manager_target=sidecar.target) as srv, Client(srv.target) as c:
        assert served_revision(c, model="a") == rev_a
        deadline = time.monotonic() + 30
        with sidecar.client() as mc:
            while (after := mc.get("a").variants[0]).last_used_at <= before.last_used_at:
                assert time.monotonic() < deadline, "the server never reported the load (RecordModelUse)"
                time.sleep(0.05)
    assert after.revision == rev_a and after.variant == before.variant
