"""Mirrors the model-manager sidecar's store into the registry by following its WatchModels stream;
an alias that moves is hot-swapped, and a variant the sidecar finds corrupt stops being served. If the
sidecar goes away, serving goes on and the watcher re-subscribes with backoff. Each load of a stored
variant, and its use at most once per RECORD_USE_SECONDS, is reported back (RecordModelUse) so the
sidecar's least-recently-used eviction sees what is served; every variant loaded or aliased here is
leased (RenewModelLeases, renewed every RENEW_SECONDS for LEASE_SECONDS) so it is never evicted, and a
failed hot swap is reported (ReportAliasFailure) so the sidecar moves the alias back for good. The
sidecar may require an API key and TLS (--manager-api-key, --manager-ca-file,
--manager-client-cert-file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import grpc.aio

from sdserve.v1 import model_manager_pb2 as mm
from sdserve.v1 import model_manager_pb2_grpc as mm_grpc
from service.engine import Engine
from service.models import ModelEntry, ModelState
from service.settings import Settings
from service.threads import run_in_fresh_thread

log = logging.getLogger(__name__)
RECORD_USE_SECONDS = 300.0
# Leases outlive two missed renewals; a server that dies releases its models within LEASE_SECONDS.
LEASE_SECONDS = 60
RENEW_SECONDS = 20.0

VARIANTS = {
    mm.WEIGHT_VARIANT_FP32: "fp32",
    mm.WEIGHT_VARIANT_FP16: "fp16",
    mm.WEIGHT_VARIANT_BF16: "bf16",
    mm.WEIGHT_VARIANT_INT8: "int8",
}
_VARIANT_VALUES = {name: value for value, name in VARIANTS.items()}


def slot_id(model: mm.StoredModel) -> str:
    """The registry slot of one stored variant: NAME@REVISION:VARIANT."""
    return f"{model.name}@{model.revision}:{VARIANTS.get(model.variant, 'unknown')}"


def parse_slot_id(key: str) -> tuple[str, str, mm.WeightVariant.ValueType] | None:
    """(name, revision, variant) of a NAME@REVISION:VARIANT slot id; None for local models."""
    name, at, rest = key.partition("@")
    revision, colon, variant = rest.rpartition(":")
    if not (at and colon and name and revision) or variant not in _VARIANT_VALUES:
        return None
    return name, revision, _VARIANT_VALUES[variant]


def preferred_variants(device_type: str) -> tuple[str, ...]:
    """Which variant a bare model name means on this device."""
    if device_type in ("cuda", "mps", "xpu"):
        return ("fp16", "bf16", "fp32", "int8")
    return ("fp32", "bf16", "fp16", "int8")


def manager_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the sidecar API key, if one is set."""
    key = settings.manager_api_key
    return (("authorization", f"Bearer {key}"),) if key else ()


def manager_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials for the sidecar (None: plaintext). Files are read on each call, so a reconnect picks up
    renewed certificates; an unreadable file raises OSError."""
    if not (settings.manager_ca_file or settings.manager_client_cert_file):
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.manager_ca_file),
        private_key=read(settings.manager_client_key_file),
        certificate_chain=read(settings.manager_client_cert_file),
    )


class StoreWatcher:
    """Follows WatchModels and applies snapshots and changes to the engine's registry."""

    def __init__(self, target: str, engine: Engine, max_message_bytes: int, settings: Settings | None = None):
        self.target = target
        self.engine = engine
        # The API key and TLS files come from the server's settings (the engine's, unless given).
        self.settings = settings if settings is not None else engine.settings
        self._options = [("grpc.max_receive_message_length", max_message_bytes)]
        self._models: dict[str, mm.StoredModel] = {}
        self._aliases: set[str] = set()
        self.synced = asyncio.Event()
        self.instance_id = ""
        self.connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._use_lock = threading.Lock()
        self._last_use_report: dict[str, float] = {}
        # This server process's lease holder id at the sidecar, and the slots it last leased there.
        self.holder = f"server-{uuid.uuid4().hex}"
        self.leased: frozenset[str] = frozenset()
        # Each is called on the event loop with the slot ids after every renewal the sidecar accepted.
        self.lease_hooks: list[Callable[[frozenset[str]], None]] = []
        self._renew = asyncio.Event()
        self._lease_warned = False
        engine.registry.load_hooks.append(lambda entry, _seconds: self.note_use(entry, loaded=True))
        engine.finish_hooks.append(lambda job, _event: self.note_use(job.entry))

    async def run(self) -> None:
        """Subscribes forever (until cancelled), reconnecting with backoff after any failure."""
        self._loop = asyncio.get_running_loop()
        leases = asyncio.create_task(self._lease_loop())
        try:
            await self._follow()
        finally:
            leases.cancel()
            # Best effort: a server that stops no longer holds its models (if this fails, the leases expire).
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._send_leases(frozenset()), 2.0)

    async def _follow(self) -> None:
        backoff = 0.2
        metadata = manager_metadata(self.settings)
        while True:
            try:
                async with self._channel() as channel:
                    stub = mm_grpc.ModelManagerServiceStub(channel)
                    async for message in stub.WatchModels(mm.WatchModelsRequest(), metadata=metadata):
                        self.connected = True
                        backoff = 0.2
                        await self.apply(message)
                log.warning("model manager closed the watch stream; re-subscribing", extra={"target": self.target})
            except OSError as exc:
                log.error("cannot read the TLS files for the model manager", extra={"error": str(exc)})
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error(
                        "model manager refused the API key (--manager-api-key); serving what is loaded",
                        extra={"target": self.target, "code": code.name},
                    )
                else:
                    level = logging.WARNING if self.connected or self.synced.is_set() else logging.INFO
                    log.log(
                        level,
                        "model manager unreachable; serving what is loaded",
                        extra={"target": self.target, "code": code.name},
                    )
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def note_use(self, entry: ModelEntry, loaded: bool = False) -> None:
        """Reports a stored variant's use to the sidecar: always after a load, else at most once per
        RECORD_USE_SECONDS. Safe from any thread; never blocks or fails the caller."""
        parsed = parse_slot_id(entry.key)
        if parsed is None or self._loop is None:
            return
        now = time.monotonic()
        with self._use_lock:
            last = self._last_use_report.get(entry.key)
            if not loaded and last is not None and now - last < RECORD_USE_SECONDS:
                return
            self._last_use_report[entry.key] = now
        asyncio.run_coroutine_threadsafe(self._record_use(*parsed), self._loop)
        if loaded:
            self._loop.call_soon_threadsafe(self._renew.set)

    async def _record_use(self, name: str, revision: str, variant: mm.WeightVariant.ValueType) -> None:
        request = mm.RecordModelUseRequest(name=name, revision=revision, variant=variant)
        try:
            async with self._channel() as channel:
                stub = mm_grpc.ModelManagerServiceStub(channel)
                await stub.RecordModelUse(request, timeout=10, metadata=manager_metadata(self.settings))
        except (grpc.aio.AioRpcError, OSError) as exc:
            log.warning(
                "could not report a model's use to the model manager",
                extra={"model": f"{name}@{revision}", "error": str(exc)},
            )

    def leased_slots(self) -> frozenset[str]:
        """Stored-variant slots this server holds: loaded, loading, or what an alias or the default points at."""
        registry = self.engine.registry
        slots = set(registry.referenced())
        for entry in registry.entries():
            with contextlib.suppress(KeyError):
                if registry.state(entry.slot)[0] in (ModelState.LOADED, ModelState.LOADING):
                    slots.add(entry.slot)
        return frozenset(s for s in slots if parse_slot_id(s) is not None)

    async def _lease_loop(self) -> None:
        """Renews the leases every RENEW_SECONDS, and at once after a load, a swap or a (re)subscription."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew.wait(), RENEW_SECONDS)
            self._renew.clear()
            await self._send_leases(self.leased_slots())

    async def _send_leases(self, slots: frozenset[str]) -> None:
        refs = []
        for slot in sorted(slots):
            parsed = parse_slot_id(slot)
            if parsed is not None:
                refs.append(mm.VariantRef(name=parsed[0], revision=parsed[1], variant=parsed[2]))
        request = mm.RenewModelLeasesRequest(holder=self.holder, variants=refs, lease_seconds=LEASE_SECONDS)
        try:
            async with self._channel() as channel:
                stub = mm_grpc.ModelManagerServiceStub(channel)
                await stub.RenewModelLeases(request, timeout=10, metadata=manager_metadata(self.settings))
        except (grpc.aio.AioRpcError, OSError) as exc:
            old = isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNIMPLEMENTED
            if old and self._lease_warned:
                return
            self._lease_warned = self._lease_warned or old
            level = logging.WARNING if self.connected else logging.DEBUG
            message = "the model manager is too old for leases; eviction may remove loaded models"
            log.log(
                level,
                message if old else "could not renew model leases with the model manager",
                extra={"error": str(exc)},
            )
            return
        self.leased = slots
        for hook in self.lease_hooks:
            hook(slots)

    async def _report_failure(self, alias: str, key: str, reason: str) -> None:
        """Tells the sidecar that `alias` cannot be served by `key`; it moves the alias back (or records why not)."""
        parsed = parse_slot_id(key)
        if parsed is None:
            return
        target = mm.VariantRef(name=parsed[0], revision=parsed[1], variant=parsed[2])
        request = mm.ReportAliasFailureRequest(alias=alias, target=target, reason=reason[:2000] or "unknown")
        try:
            async with self._channel() as channel:
                stub = mm_grpc.ModelManagerServiceStub(channel)
                reply = await stub.ReportAliasFailure(request, timeout=30, metadata=manager_metadata(self.settings))
        except (grpc.aio.AioRpcError, OSError) as exc:
            # The next snapshot (after a reconnect) tries the swap again and reports again.
            log.warning(
                "could not report a failed hot swap to the model manager",
                extra={"alias": alias, "target": key, "error": str(exc)},
            )
            return
        a = reply.alias
        log.warning(
            "reported a failed hot swap to the model manager",
            extra={
                "alias": alias,
                "target": key,
                "reverted": reply.reverted,
                "now": f"{a.model}@{a.revision}:{VARIANTS.get(a.variant, 'unknown')}",
            },
        )

    def _channel(self) -> grpc.aio.Channel:
        creds = manager_credentials(self.settings)
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=self._options)
        return grpc.aio.secure_channel(self.target, creds, options=self._options)

    async def apply(self, message: mm.WatchModelsResponse) -> None:
        kind = message.WhichOneof("event")
        if kind == "snapshot":
            snap = message.snapshot
            if self.instance_id and snap.instance_id != self.instance_id:
                log.info("model manager restarted; reconciling", extra={"instance": snap.instance_id})
            self.instance_id = snap.instance_id
            current = {slot_id(m): m for m in snap.models if m.state == mm.STORED_MODEL_STATE_READY}
            corrupt = {slot_id(m) for m in snap.models if m.state == mm.STORED_MODEL_STATE_CORRUPT}
            known = {e.slot for e in self.engine.registry.entries()}
            for gone in set(self._models) - set(current) - corrupt:
                self._drop(gone)
            for sid in corrupt & known:
                self._unserve(sid, ())
            self._models = current
            self._publish_names()
            for name in set(self._aliases) - {a.name for a in snap.aliases}:
                self._remove_alias(name)
            for alias in snap.aliases:
                await self._set_alias(alias.name, alias.model, alias.revision, alias.variant, alias.path)
            self.synced.set()
        elif kind == "model_published":
            m = message.model_published.model
            if m.state == mm.STORED_MODEL_STATE_READY:
                self._models[slot_id(m)] = m
                self._publish_names()
        elif kind == "model_removed":
            sid = slot_id(message.model_removed.model)
            self._models.pop(sid, None)
            self._drop(sid)
            self._publish_names()
        elif kind == "alias_set":
            a = message.alias_set.alias
            if message.alias_set.reverted:
                log.warning(
                    "the model manager moved an alias back to its previous target",
                    extra={"alias": a.name, "target": f"{a.model}@{a.revision}", "reason": message.alias_set.reason},
                )
            await self._set_alias(a.name, a.model, a.revision, a.variant, a.path)
        elif kind == "alias_removed":
            self._remove_alias(message.alias_removed.alias.name)
        elif kind == "model_corrupted":
            event = message.model_corrupted
            sid = slot_id(event.model)
            self._models.pop(sid, None)
            self._unserve(sid, event.problems)
            self._publish_names()
        self._forget_orphans()
        self._renew.set()

    def _entry(self, m: mm.StoredModel) -> ModelEntry:
        return ModelEntry.read(Path(m.path), name=m.name, key=slot_id(m))

    def _publish_names(self) -> None:
        """Registers every stored variant; NAME means its newest revision's preferred variant, NAME:VARIANT
        that revision's other variants."""
        newest: dict[str, mm.StoredModel] = {}
        for m in self._models.values():
            best = newest.get(m.name)
            if best is None or m.created_time.ToNanoseconds() > best.created_time.ToNanoseconds():
                newest[m.name] = m
        prefer = preferred_variants(self.engine.choice.type)
        for sid, m in self._models.items():
            names: list[str] = []
            head = newest[m.name]
            if m.revision == head.revision:
                variant = VARIANTS.get(m.variant, "")
                names.append(f"{m.name}:{variant}")
                siblings = [
                    VARIANTS.get(x.variant, "")
                    for x in self._models.values()
                    if x.name == m.name and x.revision == m.revision
                ]
                if next((v for v in prefer if v in siblings), None) == variant:
                    names.append(m.name)
            try:
                self.engine.registry.upsert(self._entry(m), names=names)
            except (ValueError, OSError) as exc:
                log.warning("stored model unreadable", extra={"model": sid, "error": str(exc)})

    def _unserve(self, sid: str, problems: Iterable[str]) -> None:
        """Stops serving a corrupt variant: its weights are dropped at once (jobs holding them finish). If an alias
        or the default still points at it, the slot stays so that requests to it load it again, which verifies its
        files and fails (FAILED_PRECONDITION naming the file) until it is repaired or the alias moves."""
        registry = self.engine.registry
        log.error("stored model is corrupt; not serving it", extra={"model": sid, "problems": list(problems)[:5]})
        registry.unload(sid)
        if sid not in registry.referenced():
            registry.remove(sid)

    def _forget_orphans(self) -> None:
        """Forgets stored-variant slots the store no longer offers as READY (removed or corrupt) once no alias or
        the default points at them, so their names stop resolving."""
        registry = self.engine.registry
        referenced = registry.referenced()
        for entry in registry.entries():
            sid = entry.slot
            if parse_slot_id(sid) is not None and sid not in self._models and sid not in referenced:
                registry.unload(sid)
                registry.remove(sid)

    def _drop(self, sid: str) -> None:
        if sid in self.engine.registry.referenced():
            # An alias still serves it from memory; it goes when the alias moves.
            return
        self.engine.registry.unload(sid)
        self.engine.registry.remove(sid)

    async def _set_alias(
        self, alias: str, model: str, revision: str, variant: mm.WeightVariant.ValueType, path: str
    ) -> None:
        self._aliases.add(alias)
        key = f"{model}@{revision}:{VARIANTS.get(variant, 'unknown')}"
        if self.engine.registry.slot_of(alias) == key:
            return
        try:
            entry = ModelEntry.read(Path(path), name=model, key=key)
        except (ValueError, OSError) as exc:
            log.error(
                "alias target unreadable; the alias keeps its model",
                extra={"alias": alias, "target": key, "error": str(exc)},
            )
            self.engine.record_swap(False)
            await self._report_failure(alias, key, f"unreadable: {exc}")
            return
        ok = await run_in_fresh_thread(lambda: self.engine.swap(alias, entry), "sdserve-swap")
        if not ok:
            # Every process must agree on what the alias serves: the sidecar moves it back, persistently.
            await self._report_failure(alias, key, self.engine.last_swap_error)

    def _remove_alias(self, alias: str) -> None:
        self._aliases.discard(alias)
        before = self.engine.registry.remove_alias(alias)
        if before:
            self.engine.release(before)

    def aliases(self) -> Iterable[str]:
        return tuple(self._aliases)
