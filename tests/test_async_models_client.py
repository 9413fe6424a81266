"""The asyncio model-manager client against a real sidecar, and the store watcher on it driving a model lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import pytest

from sdserve.errors import SdserveError
from sdserve.models_client import (
    Alias,
    AliasSet,
    AsyncModelManagerClient,
    ModelCorrupted,
    ModelManagerClient,
    ModelRemoved,
    Snapshot,
    StoredModel,
    WatchEvent,
)
from service import device, watcher
from service.jobs import Job
from service.models import ModelEntry, ModelRegistry, ModelState
from service.observers import Observer
from service.requests import Event
from service.settings import Settings
from service.tiny import build_tiny
from service.watcher import StoreWatcher, UsageLog, parse_stored_slot
from tests.model_manager.harness import Sidecar
from tests.model_manager.test_integrity import UNET, flip, next_of


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a, b and c: tiny models with different weights, to import into the sidecar."""
    root = tmp_path_factory.mktemp("async-sources")
    for name, seed in (("a", 0), ("b", 5), ("c", 9)):
        build_tiny(root / name, seed=seed)
    return root


@pytest.fixture()
def car(tmp_path: Path, sources: Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(tmp_path / "store", import_roots=[sources], args=["--scrub-interval-seconds", "0.5"]).start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


def imported(car: Sidecar, sources: Path, *names: str) -> list[str]:
    """Imports sources/NAME for each name; returns their revisions."""
    with car.client() as mc:
        return [mc.import_model(str(sources / name), name=name).model.revision for name in names]


def test_renew_leases_report_alias_failure_and_record_use(car: Sidecar, sources: Path) -> None:
    rev_a, rev_b = imported(car, sources, "a", "b")
    with car.client() as mc:
        mc.set_alias("prod", "a")
        mc.set_alias("prod", "b")
        (before,) = mc.get("a").variants

    async def main() -> None:
        async with AsyncModelManagerClient(car.target) as c:
            await c.record_use("a", rev_a, "fp32", timeout=10)
            leases = [("a", rev_a, "fp32"), ("gone", "0" * 16, "fp32")]
            unknown, expires = await c.renew_leases("server-x", leases, lease_seconds=60, timeout=10)
            assert [u.name for u in unknown] == ["gone"] and expires > time.time()
            assert {m.name: m.lease_holders for m in (await c.list()).models} == {"a": 1, "b": 0}
            await c.renew_leases("server-x", [])
            assert {m.name: m.lease_holders for m in (await c.list()).models} == {"a": 0, "b": 0}

            alias, reverted = await c.report_alias_failure("prod", "b", rev_b, "fp32", "ValueError: size mismatch")
            assert reverted and (alias.name, alias.model, alias.revision) == ("prod", "a", rev_a)
            failure = alias.last_failure
            assert failure is not None and failure.reporter == "server" and failure.target.name == "b"
            assert "size mismatch" in failure.reason
            await errors(c, rev_a, rev_b)

    asyncio.run(main())
    with car.client() as mc:
        (after,) = mc.get("a").variants
    assert after.last_used_at > before.last_used_at


async def errors(c: AsyncModelManagerClient, rev_a: str, rev_b: str) -> None:
    """Each failure is an SdserveError with the sidecar's code and field violations."""
    with pytest.raises(SdserveError) as err:
        await c.renew_leases("bad holder", [])
    assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "holder", err.value
    with pytest.raises(SdserveError) as err:
        await c.report_alias_failure("prod", "b", rev_b, "fp32", "")
    assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "reason", err.value
    with pytest.raises(SdserveError) as err:
        await c.report_alias_failure("nope", "b", rev_b, "fp32", "x")
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(SdserveError) as err:
        await c.record_use("a", rev_a, "fp8")
    assert err.value.code == "INVALID_ARGUMENT" and "fp8" in err.value.message
    # The deadline against a peer that accepts connections and never answers: a tiny deadline on the live sidecar
    # raced its answer (an already connected channel sends the call before the deadline's timer fires).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        async with AsyncModelManagerClient(f"127.0.0.1:{silent.getsockname()[1]}") as mute:
            with pytest.raises(SdserveError) as err:
                await mute.record_use("a", rev_a, "fp32", timeout=0.2)
    assert err.value.code == "DEADLINE_EXCEEDED"


def test_channel_options_replace_the_client_defaults(car: Sidecar, sources: Path) -> None:
    imported(car, sources, "a")

    async def main() -> None:
        async with AsyncModelManagerClient(car.target, options=[("grpc.max_receive_message_length", 64)]) as small:
            with pytest.raises(SdserveError) as err:
                await small.list()
            assert err.value.code == "RESOURCE_EXHAUSTED"
        async with AsyncModelManagerClient(car.target) as c:
            assert [m.name for m in (await c.list()).models] == ["a"]

    asyncio.run(main())


# ---- the watcher ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Swapped:
    ok: bool
    error: str = ""
    failed: str = ""


class RegistryLifecycle:
    """The watcher's Lifecycle over a real ModelRegistry. A swap points the alias without loading (it fails for the
    models named in `broken`); refused swaps are recorded."""

    device_type = "cpu"

    def __init__(self, registry: ModelRegistry, broken: Iterable[str] = ()):
        self.registry = registry
        self.broken = set(broken)
        self.swaps: list[tuple[str, str, bool]] = []
        self.refused: list[tuple[str, str, str]] = []

    def entries(self) -> list[ModelEntry]:
        return self.registry.entries()

    def slot_of(self, name: str) -> str | None:
        return self.registry.slot_of(name)

    def is_canary(self, alias: str) -> bool:
        return alias in self.registry.weighted_aliases()

    def referenced(self) -> set[str]:
        return self.registry.referenced()

    def held(self) -> set[str]:
        states = (ModelState.LOADED, ModelState.LOADING)
        return {e.slot for e in self.entries() if self.registry.state(e.slot)[0] in states}

    def publish(self, entry: ModelEntry, names: Iterable[str]) -> None:
        self.registry.upsert(entry, names=names)

    def forget(self, slot: str) -> None:
        if slot not in self.referenced():
            self.registry.unload(slot)
            self.registry.remove(slot)

    def unserve(self, slot: str) -> None:
        self.registry.unload(slot)
        if slot not in self.referenced():
            self.registry.remove(slot)

    def swap(self, alias: str, entry: ModelEntry) -> Swapped:
        ok = entry.name not in self.broken
        self.swaps.append((alias, entry.slot, ok))
        if not ok:
            return Swapped(False, f"could not load {entry.name}")
        self.registry.upsert(entry)
        self.registry.set_alias(alias, entry.slot)
        return Swapped(True)

    def swap_weighted(self, alias: str, targets: list[tuple[ModelEntry, int]]) -> Swapped:
        for entry, _ in targets:
            if entry.name in self.broken:
                self.swaps.append((alias, entry.slot, False))
                return Swapped(False, f"could not load {entry.name}", entry.slot)
        for entry, _ in targets:
            self.registry.upsert(entry)
        self.registry.set_weighted(alias, tuple((e.slot, w) for e, w in targets))
        self.swaps.append((alias, ",".join(e.slot for e, _ in targets), True))
        return Swapped(True)

    def refuse_swap(self, alias: str, target: str, reason: str) -> None:
        self.refused.append((alias, target, reason))

    def remove_alias(self, alias: str) -> None:
        self.registry.remove_alias(alias)


class Renewals(Observer):
    """Counts the lease renewals the watcher reports."""

    def __init__(self) -> None:
        self.seen: list[frozenset[str]] = []

    def leases_renewed(self, slots: frozenset[str]) -> None:
        self.seen.append(slots)


@contextlib.contextmanager
def running(w: StoreWatcher) -> Iterator[None]:
    """Runs the watcher on its own event loop thread, as the server does; cancels it (which releases the leases)
    on the way out."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(w.run())

    async def main() -> None:
        await asyncio.wait([task])
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(30)
        loop.close()


def wait_for(w: StoreWatcher, predicate: object, timeout: float = 60) -> None:
    """Waits until `predicate` holds, re-checked after each lease renewal (every applied event ends with one)."""
    with w.leases_changed:
        assert w.leases_changed.wait_for(predicate, timeout)  # type: ignore[arg-type]


def served(registry: ModelRegistry) -> set[str]:
    return {name for name in registry.names() if "@" not in name}


def test_the_watcher_mirrors_the_store_into_the_lifecycle(car: Sidecar, sources: Path) -> None:
    rev_a, rev_b, rev_c = imported(car, sources, "a", "b", "c")
    slot_a, slot_b, slot_c = (f"{n}@{r}:fp32" for n, r in (("a", rev_a), ("b", rev_b), ("c", rev_c)))
    with car.client() as mc:
        mc.set_alias("prod", "a")
    usage, renewals = UsageLog(), Renewals()
    registry = ModelRegistry([], device.choose("cpu", "float32"), observer=usage)
    life = RegistryLifecycle(registry, broken={"c"})
    w = StoreWatcher(car.target, life, car_settings(), usage, observer=renewals)
    with running(w), car.client() as mc, mc.watch() as watch:
        events = iter(watch)
        assert isinstance(next(events), Snapshot)
        wait_for(w, lambda: w.synced.is_set() and slot_a in w.leased)
        assert served(registry) == {"a", "a:fp32", "b", "b:fp32", "c", "c:fp32"}
        assert registry.slot_of("prod") == slot_a and life.swaps == [("prod", slot_a, True)]
        assert renewals.seen[-1] == w.leased == {slot_a}

        # A swap that fails is reported: the sidecar moves the alias back, and the watcher keeps it there.
        mc.set_alias("prod", "c")
        moved = next_of(events, AliasSet)
        assert isinstance(moved, AliasSet) and moved.alias.model == "c"
        moved = next_of(events, AliasSet)
        assert isinstance(moved, AliasSet) and moved.reverted and moved.alias.model == "a"
        assert "could not load c" in moved.reason
        wait_for(w, lambda: len(life.swaps) == 2 and registry.slot_of("prod") == slot_a)
        assert life.swaps[1] == ("prod", slot_c, False)

        mc.set_alias("prod", "b")
        wait_for(w, lambda: registry.slot_of("prod") == slot_b and w.leased == {slot_b})
        # a is no longer aliased: loading it reports its use and leases it.
        (before,) = mc.get("a").variants
        loaded = registry.entry_of("a")
        assert loaded is not None and loaded.slot == slot_a
        registry.get_loaded(loaded)
        wait_for(w, lambda: w.leased == {slot_a, slot_b})
        wait_for(w, lambda: mc.get("a").variants[0].last_used_at > before.last_used_at)

        mc.delete("c")
        assert isinstance(next_of(events, ModelRemoved), ModelRemoved)
        wait_for(w, lambda: "c" not in served(registry) and slot_c not in {e.slot for e in registry.entries()})

        mc.delete_alias("prod")
        wait_for(w, lambda: registry.slot_of("prod") is None and w.leased == {slot_a})
        mc.set_alias("solo", "b")  # a new alias: nothing to go back to
        wait_for(w, lambda: registry.slot_of("solo") == slot_b and w.leased == {slot_a, slot_b})
        corrupt(w, mc, events, registry, slot_a, slot_b)
    assert life.refused == []
    # Stopping releases the leases.
    with car.client() as mc:
        assert {m.name: m.lease_holders for m in mc.list().models} == {"a": 0, "b": 0}


def corrupt(
    w: StoreWatcher,
    mc: ModelManagerClient,
    events: Iterator[WatchEvent],
    registry: ModelRegistry,
    slot_a: str,
    slot_b: str,
) -> None:
    """A loaded variant that turns corrupt is unloaded and forgotten; one an alias points at is only unloaded
    (requests to it fail until the alias moves), and forgotten once the alias goes."""
    b = registry.entry_of("solo")
    assert b is not None
    registry.get_loaded(b)
    flip(Path(mc.get("a").variants[0].path) / UNET, -1000)
    assert isinstance(next_of(events, ModelCorrupted), ModelCorrupted)
    wait_for(w, lambda: slot_a not in {e.slot for e in registry.entries()} and w.leased == {slot_b})
    assert "a" not in served(registry) and registry.state(slot_b)[0] is ModelState.LOADED

    flip(Path(b.path) / UNET, -1000)
    assert isinstance(next_of(events, ModelCorrupted), ModelCorrupted)
    wait_for(w, lambda: registry.state(slot_b)[0] is not ModelState.LOADED)
    assert registry.slot_of("solo") == slot_b and w.leased == {slot_b}
    mc.delete_alias("solo")
    wait_for(w, lambda: not registry.entries() and not w.leased)


def car_settings() -> Settings:
    return Settings(max_message_bytes=8 * 1024 * 1024)


def test_an_unreadable_alias_target_is_refused_and_reported(
    car: Sidecar, sources: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (rev_a,) = imported(car, sources, "a")
    registry = ModelRegistry([], device.choose("cpu", "float32"))
    life = RegistryLifecycle(registry)
    w = StoreWatcher(car.target, life, car_settings(), UsageLog())
    ghost = Alias("ghost", "a", rev_a, "fp32", "/nonexistent/folder", 0.0)
    with caplog.at_level(logging.WARNING, logger="service.watcher"):
        asyncio.run(w.apply(AliasSet(1, 0.0, ghost, target=cast(StoredModel, None), previous=None)))
    ((alias, target, reason),) = life.refused
    assert (alias, target) == ("ghost", f"a@{rev_a}:fp32") and "model_index.json" in reason
    # The sidecar has no alias `ghost`: the report fails, is logged, and the next snapshot retries it.
    (record,) = [
        r for r in caplog.records if r.getMessage() == "could not report a failed hot swap to the model manager"
    ]
    assert "NOT_FOUND" in record.__dict__["error"]
    assert registry.slot_of("ghost") is None and list(w.aliases()) == ["ghost"]


def test_usage_log_hands_on_every_load_and_other_uses_at_most_every_record_use_seconds(
    sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry_a = ModelEntry.read(sources / "a", name="a", slot="a@r1:fp32")
    entry_b = ModelEntry.read(sources / "b", name="b", slot="b@r2:fp16")
    local = ModelEntry.read(sources / "c")
    usage = UsageLog()
    got: list[tuple[str, bool]] = []
    loop = asyncio.new_event_loop()
    try:
        usage.model_loaded(entry_a, 1.0)  # no watcher yet: dropped
        usage.attach(loop, lambda slot, loaded: got.append((slot, loaded)))
        usage.model_loaded(entry_a, 1.0)
        usage.note(entry_a.slot)  # just loaded: reported already
        usage.model_loaded(local, 1.0)  # not a stored variant
        finished = cast(Job, dataclasses.make_dataclass("J", [("entry", ModelEntry)])(entry_b))
        usage.request_finished(finished, cast(Event, None))
        usage.request_finished(finished, cast(Event, None))
        usage.model_loaded(entry_b, 1.0)
        monkeypatch.setattr(watcher, "RECORD_USE_SECONDS", 0.0)
        usage.request_finished(finished, cast(Event, None))
        usage.detach()
        usage.model_loaded(entry_a, 1.0)
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert got == [("a@r1:fp32", True), ("b@r2:fp16", False), ("b@r2:fp16", True), ("b@r2:fp16", False)]


def test_stored_slots_name_variants_only() -> None:
    assert parse_stored_slot("a@0123abcd:fp16") == ("a", "0123abcd", "fp16")
    for local in ("shapes", "a@r", "a@r:fp64", "@r:fp32", "a@:fp32"):
        assert parse_stored_slot(local) is None, local
