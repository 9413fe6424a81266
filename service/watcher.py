"""Mirrors the model-manager sidecar's store into this server's models by following its WatchModels stream.

An alias that moves is hot-swapped, and a variant the sidecar finds corrupt stops being served. If the sidecar goes
away, serving goes on and the watcher re-subscribes with backoff. Each load of a stored variant, and its use at most
once per RECORD_USE_SECONDS, is reported back (RecordModelUse) so the sidecar's least-recently-used eviction sees what
is served; every variant loaded or aliased here is leased (RenewModelLeases, renewed every RENEW_SECONDS for
LEASE_SECONDS) so it is never evicted, and a failed hot swap is reported (ReportAliasFailure) so the sidecar moves the
alias back for good. The sidecar may require an API key and TLS (--manager-api-key, --manager-ca-file,
--manager-client-cert-file).

The watcher changes models only through the model lifecycle (the `Lifecycle` protocol below) and talks to the
sidecar only through sdserve.models_client.AsyncModelManagerClient, a new one per connection or call so that renewed
TLS files are picked up. A model's uses reach it through `UsageLog`, one of the server's observers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdserve.errors import SdserveError
from sdserve.models_client import (
    Alias,
    AliasRemoved,
    AliasSet,
    AsyncModelManagerClient,
    ModelCorrupted,
    ModelPublished,
    ModelRemoved,
    Snapshot,
    StoredModel,
    WatchEvent,
    tls_credentials,
)
from service.models import ModelEntry
from service.observers import Observer
from service.settings import Settings
from service.threads import run_in_fresh_thread

if TYPE_CHECKING:
    from service.adapters import AdapterCatalog
    from service.jobs import Job
    from service.requests import Event

log = logging.getLogger(__name__)
RECORD_USE_SECONDS = 300.0
# Leases outlive two missed renewals; a server that dies releases its models within LEASE_SECONDS.
LEASE_SECONDS = 60
RENEW_SECONDS = 20.0
VARIANTS = ("fp32", "fp16", "bf16", "int8")


def _format_slot(name: str, revision: str, variant: str) -> str:
    return f"{name}@{revision}:{variant or 'unknown'}"


def stored_slot(model: StoredModel) -> str:
    """The registry slot of one stored variant: NAME@REVISION:VARIANT."""
    return _format_slot(model.name, model.revision, model.variant)


def parse_stored_slot(slot: str) -> tuple[str, str, str] | None:
    """(name, revision, variant) of a NAME@REVISION:VARIANT slot; None for local models."""
    name, at, rest = slot.partition("@")
    revision, colon, variant = rest.rpartition(":")
    if not (at and colon and name and revision) or variant not in VARIANTS:
        return None
    return name, revision, variant


def preferred_variants(device_type: str) -> tuple[str, ...]:
    """Which variant a bare model name means on this device."""
    if device_type in ("cuda", "mps", "xpu"):
        return ("fp16", "bf16", "fp32", "int8")
    return ("fp32", "bf16", "fp16", "int8")


class SwapOutcome(Protocol):
    """How a hot swap ended: `error` says why when not `ok`."""

    @property
    def ok(self) -> bool: ...

    @property
    def error(self) -> str: ...

    @property
    def failed(self) -> str:
        """A canary swap: the slot of the target that could not serve."""
        ...


class Lifecycle(Protocol):
    """What the watcher asks of the model lifecycle (service.lifecycle.ModelLifecycle); slots are registry slots."""

    @property
    def device_type(self) -> str:
        """The device models load on (cuda, mps, xpu or cpu): it picks the variant a bare model name means."""
        ...

    def entries(self) -> list[ModelEntry]: ...

    def slot_of(self, name: str) -> str | None: ...

    def is_canary(self, alias: str) -> bool:
        """Whether `alias` is split between weighted targets."""
        ...

    def referenced(self) -> set[str]:
        """Slots that an alias or the default points at."""
        ...

    def held(self) -> set[str]:
        """Slots loaded or loading now."""
        ...

    def publish(self, entry: ModelEntry, names: Iterable[str]) -> None: ...

    def forget(self, slot: str) -> None:
        """Unloads and removes the slot, unless an alias or the default points at it (then nothing)."""
        ...

    def unserve(self, slot: str) -> None:
        """Unloads the slot now; removes it only if nothing points at it."""
        ...

    def swap(self, alias: str, entry: ModelEntry) -> SwapOutcome:
        """Blocking hot swap of `alias` to `entry`."""
        ...

    def swap_weighted(self, alias: str, targets: list[tuple[ModelEntry, int]]) -> SwapOutcome:
        """Blocking hot swap of `alias` to a canary split between `targets` (entries and weights)."""
        ...

    def refuse_swap(self, alias: str, target: str, reason: str) -> None:
        """Logs and records a swap of `alias` to slot `target` that could not start (its folder unreadable)."""
        ...

    def remove_alias(self, alias: str) -> None: ...


class UsageLog(Observer):
    """Notes the use of stored variants for the StoreWatcher to report (RecordModelUse): every load, and other use
    (a finished request) at most once per RECORD_USE_SECONDS per variant. The server passes it among the engine's
    observers and to its StoreWatcher. Thread-safe and never blocks; uses noted while no watcher runs are dropped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._sink: tuple[asyncio.AbstractEventLoop, Callable[[str, bool], None]] | None = None

    def model_loaded(self, entry: ModelEntry, seconds: float) -> None:
        self.note(entry.slot, loaded=True)

    def request_finished(self, job: Job, event: Event) -> None:
        self.note(job.entry.slot)

    def note(self, slot: str, loaded: bool = False) -> None:
        """Hands one use of `slot` to the running watcher, unless it is a local model or was reported lately."""
        if parse_stored_slot(slot) is None:
            return
        now = time.monotonic()
        with self._lock:
            if self._sink is None:
                return
            loop, report = self._sink
            last = self._last.get(slot)
            if not loaded and last is not None and now - last < RECORD_USE_SECONDS:
                return
            self._last[slot] = now
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(report, slot, loaded)

    def attach(self, loop: asyncio.AbstractEventLoop, report: Callable[[str, bool], None]) -> None:
        """From now on each use is passed to report(slot, loaded), called on `loop`."""
        with self._lock:
            self._sink = (loop, report)

    def detach(self) -> None:
        with self._lock:
            self._sink = None


class StoreWatcher:
    """Follows WatchModels and applies the snapshot and each change to this server's models through `lifecycle`.

    `usage` brings the uses to report; `observer` hears of each lease renewal the sidecar accepted, and so do the
    threads waiting on `leases_changed` (a threading.Condition notified after `leased` is updated; the event loop
    takes it to notify, so a waiter must not hold it for long)."""

    def __init__(
        self,
        target: str,
        lifecycle: Lifecycle,
        settings: Settings,
        usage: UsageLog,
        *,
        observer: Observer | None = None,
        adapters: AdapterCatalog | None = None,
    ):
        self.target = target
        # Told the store's adapters folder, to read the sidecar's adapters from the shared volume.
        self._adapters = adapters
        self.lifecycle = lifecycle
        # The API key, TLS files and message limit for the sidecar.
        self.settings = settings
        self.usage = usage
        self._observer = observer if observer is not None else Observer()
        self._models: dict[str, StoredModel] = {}
        self._aliases: set[str] = set()
        self.synced = asyncio.Event()
        self.instance_id = ""
        self.connected = False
        # This server process's lease holder id at the sidecar, and the slots it last leased there.
        self.holder = f"server-{uuid.uuid4().hex}"
        self.leased: frozenset[str] = frozenset()
        self.leases_changed = threading.Condition()
        self._renew = asyncio.Event()
        self._lease_warned = False
        self._reports: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Subscribes forever (until cancelled), reconnecting with backoff after any failure."""
        self.usage.attach(asyncio.get_running_loop(), self._used)
        leases = asyncio.create_task(self._lease_loop())
        try:
            await self._follow()
        finally:
            self.usage.detach()
            leases.cancel()
            # Best effort: a server that stops no longer holds its models (if this fails, the leases expire).
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._send_leases(frozenset()), 2.0)

    def _client(self) -> AsyncModelManagerClient:
        """A new client; its TLS files are read now, so a reconnect picks up renewed certificates (an unreadable
        file raises OSError)."""
        s = self.settings
        credentials = None
        if s.manager_ca_file or s.manager_client_cert_file:
            credentials = tls_credentials(s.manager_ca_file, s.manager_client_cert_file, s.manager_client_key_file)
        return AsyncModelManagerClient(
            self.target,
            api_key=s.manager_api_key or None,
            credentials=credentials,
            options=[("grpc.max_receive_message_length", s.max_message_bytes)],
        )

    async def _follow(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with self._client() as client, contextlib.aclosing(client.watch()) as events:
                    async for event in events:
                        self.connected = True
                        backoff = 0.2
                        await self.apply(event)
                log.warning("model manager closed the watch stream; re-subscribing", extra={"target": self.target})
            except OSError as exc:
                log.error("cannot read the TLS files for the model manager", extra={"error": str(exc)})
            except SdserveError as err:
                self._log_watch_error(err)
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _log_watch_error(self, err: SdserveError) -> None:
        if err.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            log.error(
                "model manager refused the API key (--manager-api-key); serving what is loaded",
                extra={"target": self.target, "code": err.code},
            )
            return
        level = logging.WARNING if self.connected or self.synced.is_set() else logging.INFO
        log.log(
            level, "model manager unreachable; serving what is loaded", extra={"target": self.target, "code": err.code}
        )

    def _used(self, slot: str, loaded: bool) -> None:
        """On the event loop, for each use `usage` passes on: reports it; a load also renews the leases at once."""
        task = asyncio.create_task(self._record_use(slot))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)
        if loaded:
            self._renew.set()

    async def _record_use(self, slot: str) -> None:
        parsed = parse_stored_slot(slot)
        if parsed is None:
            return
        name, revision, variant = parsed
        try:
            async with self._client() as client:
                await client.record_use(name, revision, variant, timeout=10)
        except (SdserveError, OSError) as exc:
            log.warning(
                "could not report a model's use to the model manager",
                extra={"model": f"{name}@{revision}", "error": str(exc)},
            )

    def leased_slots(self) -> frozenset[str]:
        """Stored-variant slots this server holds: loaded, loading, or what an alias or the default points at."""
        slots = self.lifecycle.referenced() | self.lifecycle.held()
        return frozenset(s for s in slots if parse_stored_slot(s) is not None)

    async def _lease_loop(self) -> None:
        """Renews the leases every RENEW_SECONDS, and at once after a load, a swap or a (re)subscription."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew.wait(), RENEW_SECONDS)
            self._renew.clear()
            await self._send_leases(self.leased_slots())

    async def _send_leases(self, slots: frozenset[str]) -> None:
        variants = [parsed for parsed in map(parse_stored_slot, sorted(slots)) if parsed is not None]
        try:
            async with self._client() as client:
                await client.renew_leases(self.holder, variants, lease_seconds=LEASE_SECONDS, timeout=10)
        except (SdserveError, OSError) as exc:
            self._log_lease_error(exc)
            return
        self.leased = slots
        self._observer.leases_renewed(slots)
        with self.leases_changed:
            self.leases_changed.notify_all()

    def _log_lease_error(self, exc: SdserveError | OSError) -> None:
        old = isinstance(exc, SdserveError) and exc.code == "UNIMPLEMENTED"
        if old and self._lease_warned:
            return
        self._lease_warned = self._lease_warned or old
        level = logging.WARNING if self.connected else logging.DEBUG
        message = "the model manager is too old for leases; eviction may remove loaded models"
        log.log(
            level, message if old else "could not renew model leases with the model manager", extra={"error": str(exc)}
        )

    async def _report_failure(self, alias: str, slot: str, reason: str) -> None:
        """Tells the sidecar that `alias` cannot be served by `slot`; it moves the alias back (or records why not)."""
        parsed = parse_stored_slot(slot)
        if parsed is None:
            return
        try:
            async with self._client() as client:
                now, reverted = await client.report_alias_failure(
                    alias, *parsed, reason[:2000] or "unknown", timeout=30
                )
        except (SdserveError, OSError) as exc:
            # The next snapshot (after a reconnect) tries the swap again and reports again.
            log.warning(
                "could not report a failed hot swap to the model manager",
                extra={"alias": alias, "target": slot, "error": str(exc)},
            )
            return
        log.warning(
            "reported a failed hot swap to the model manager",
            extra={
                "alias": alias,
                "target": slot,
                "reverted": reverted,
                "now": _format_slot(now.model, now.revision, now.variant),
            },
        )

    async def apply(self, event: WatchEvent) -> None:
        """Applies one WatchModels event, then forgets orphaned slots and renews the leases at once."""
        if isinstance(event, Snapshot):
            await self._apply_snapshot(event)
        elif isinstance(event, ModelPublished):
            if event.model.state == "ready":
                self._models[stored_slot(event.model)] = event.model
                self._publish_names()
        elif isinstance(event, ModelRemoved):
            slot = stored_slot(event.model)
            self._models.pop(slot, None)
            # An alias that still serves it from memory keeps it until the alias moves.
            self.lifecycle.forget(slot)
            self._publish_names()
        elif isinstance(event, AliasSet):
            if event.reverted:
                a = event.alias
                log.warning(
                    "the model manager moved an alias back to its previous target",
                    extra={"alias": a.name, "target": f"{a.model}@{a.revision}", "reason": event.reason},
                )
            await self._set_alias(event.alias)
        elif isinstance(event, AliasRemoved):
            self._remove_alias(event.alias.name)
        elif isinstance(event, ModelCorrupted):
            slot = stored_slot(event.model)
            self._models.pop(slot, None)
            self._unserve(slot, event.problems)
            self._publish_names()
        self._forget_orphans()
        self._renew.set()

    def _follow_adapters(self, snap: Snapshot) -> None:
        """Adds the store's adapters folder (the snapshot's, or <store>/adapters) to the adapter catalog."""
        folder = getattr(snap, "adapters_dir", "")
        if not folder and snap.store_path:
            folder = str(Path(snap.store_path) / "adapters")
        if self._adapters is not None and folder:
            self._adapters.add_dir(Path(folder))

    async def _apply_snapshot(self, snap: Snapshot) -> None:
        if self.instance_id and snap.instance_id != self.instance_id:
            log.info("model manager restarted; reconciling", extra={"instance": snap.instance_id})
        self.instance_id = snap.instance_id
        self._follow_adapters(snap)
        current = {stored_slot(m): m for m in snap.models if m.state == "ready"}
        corrupt = {stored_slot(m) for m in snap.models if m.state == "corrupt"}
        known = {e.slot for e in self.lifecycle.entries()}
        for gone in set(self._models) - set(current) - corrupt:
            self.lifecycle.forget(gone)
        for slot in corrupt & known:
            self._unserve(slot, ())
        self._models = current
        self._publish_names()
        for name in self._aliases - {a.name for a in snap.aliases}:
            self._remove_alias(name)
        for alias in snap.aliases:
            await self._set_alias(alias)
        self.synced.set()

    def _publish_names(self) -> None:
        """Publishes every stored variant; NAME means its newest revision's preferred variant, NAME:VARIANT
        that revision's other variants."""
        newest: dict[str, StoredModel] = {}
        for m in self._models.values():
            best = newest.get(m.name)
            if best is None or m.created_at > best.created_at:
                newest[m.name] = m
        prefer = preferred_variants(self.lifecycle.device_type)
        for slot, m in self._models.items():
            names = self._names_of(m, newest[m.name], prefer)
            try:
                self.lifecycle.publish(ModelEntry.read(Path(m.path), name=m.name, slot=slot), names)
            except (ValueError, OSError) as exc:
                log.warning("stored model unreadable", extra={"model": slot, "error": str(exc)})

    def _names_of(self, m: StoredModel, head: StoredModel, prefer: tuple[str, ...]) -> list[str]:
        """The public names of stored variant `m`, given its model's newest revision `head`."""
        if m.revision != head.revision:
            return []
        names = [f"{m.name}:{m.variant}"]
        siblings = [x.variant for x in self._models.values() if x.name == m.name and x.revision == m.revision]
        if next((v for v in prefer if v in siblings), None) == m.variant:
            names.append(m.name)
        return names

    def _unserve(self, slot: str, problems: Iterable[str]) -> None:
        """Stops serving a corrupt variant: its weights are dropped at once (jobs holding them finish). If an alias
        or the default still points at it, the slot stays so that requests to it load it again, which verifies its
        files and fails (FAILED_PRECONDITION naming the file) until it is repaired or the alias moves."""
        log.error("stored model is corrupt; not serving it", extra={"model": slot, "problems": list(problems)[:5]})
        self.lifecycle.unserve(slot)

    def _forget_orphans(self) -> None:
        """Forgets stored-variant slots the store no longer offers as READY (removed or corrupt) once no alias or
        the default points at them, so their names stop resolving."""
        for entry in self.lifecycle.entries():
            slot = entry.slot
            if parse_stored_slot(slot) is not None and slot not in self._models:
                self.lifecycle.forget(slot)

    async def _set_alias(self, alias: Alias) -> None:
        self._aliases.add(alias.name)
        if alias.targets:
            await self._set_canary(alias)
            return
        slot = _format_slot(alias.model, alias.revision, alias.variant)
        if self.lifecycle.slot_of(alias.name) == slot and not self.lifecycle.is_canary(alias.name):
            return
        try:
            entry = ModelEntry.read(Path(alias.path), name=alias.model, slot=slot)
        except (ValueError, OSError) as exc:
            # It logs "alias target unreadable; the alias keeps its model".
            self.lifecycle.refuse_swap(alias.name, slot, str(exc))
            await self._report_failure(alias.name, slot, f"unreadable: {exc}")
            return
        result = await run_in_fresh_thread(lambda: self.lifecycle.swap(alias.name, entry), "sdserve-swap")
        if not result.ok:
            # Every process must agree on what the alias serves: the sidecar moves it back, persistently.
            await self._report_failure(alias.name, slot, result.error)

    async def _set_canary(self, alias: Alias) -> None:
        """Splits a canary alias between its targets once every one of them is loaded and warm; a target that cannot
        serve is reported, and the sidecar takes it out of the split (the next snapshot or event brings the rest)."""
        targets: list[tuple[ModelEntry, int]] = []
        for t in alias.targets:
            slot = _format_slot(t.model, t.revision, t.variant)
            try:
                targets.append((ModelEntry.read(Path(t.path), name=t.model, slot=slot), t.weight))
            except (ValueError, OSError) as exc:
                self.lifecycle.refuse_swap(alias.name, slot, str(exc))
                await self._report_failure(alias.name, slot, f"unreadable: {exc}")
                return
        result = await run_in_fresh_thread(lambda: self.lifecycle.swap_weighted(alias.name, targets), "sdserve-swap")
        if not result.ok:
            await self._report_failure(alias.name, result.failed, result.error)

    def _remove_alias(self, alias: str) -> None:
        self._aliases.discard(alias)
        self.lifecycle.remove_alias(alias)

    def aliases(self) -> Iterable[str]:
        return tuple(self._aliases)
