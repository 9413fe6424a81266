"""Reconciles the declared-state file into the store with the servicer's own operations, and watches it for changes.

A pass pulls or imports each declared model that is missing, makes its variants, verifies them, then moves the
aliases that point at it; an alias moves only to a target that is stored and verified. A failing entry is reported
(log line, metrics, status()) and never stops the others. Models the file no longer names are kept: see
docs/declared-state.md."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from model_manager import declared, errors
from model_manager.adapters import AdapterImport, AdapterPull, AdapterStore, check_import, check_pull
from model_manager.declared import DeclaredAdapter, DeclaredAlias, DeclaredModel, DeclaredState, HubSource
from model_manager.names import Variant
from model_manager.ops import ImportRequest, OperationResult, Operations, PullRequest, VariantRequest
from model_manager.progress import Progress, Reporter
from model_manager.settings import Settings
from model_manager.store import READY, VariantKey

log = logging.getLogger(__name__)

PENDING, RUNNING, OK, FAILED = "pending", "running", "ready", "failed"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies one version of the file: Kubernetes swaps a `..data` link, so the resolved path changes too."""

    path: str
    inode: int
    mtime_ns: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class EntryStatus:
    """One declared entry: `entry` is its place in the file (models[0], adapters[1], aliases.default)."""

    entry: str
    name: str
    state: str
    reason: str = ""
    # Models: the ready variants; adapters: the stored adapter; aliases: the target it points at now.
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class ReconcileStatus:
    """Where the declared state stands (read-only; for logs, metrics and a later API)."""

    path: str
    sha256: str
    running: bool
    file_error: str
    last_pass_at: float
    last_success_at: float
    entries: tuple[EntryStatus, ...]
    # What the running entry's operation is doing ("downloading 1048576/5136110 bytes"); empty between passes.
    activity: str = ""

    @property
    def converged(self) -> bool:
        return bool(self.sha256) and not self.file_error and all(e.state == OK for e in self.entries)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """A model entry's ready (stored and verified) variants, and why any declared one is missing."""

    keys: dict[str, VariantKey]
    error: str = ""


def fingerprint(path: Path) -> tuple[Fingerprint, bytes]:
    """The file's fingerprint and bytes, read through its links; raises OSError."""
    resolved = os.path.realpath(path)
    with open(resolved, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = fh.read()
    return Fingerprint(resolved, st.st_ino, st.st_mtime_ns, hashlib.sha256(data).hexdigest()), data


def reconciler_for(settings: Settings, ops: Operations, adapters: AdapterStore) -> Reconciler | None:
    """The reconciler of --declared-state, or None when the sidecar has no declared-state file."""
    if not settings.declared_state:
        return None
    path = Path(settings.declared_state)
    return Reconciler(path, ops, adapters, settings.declared_poll_seconds, settings.declared_retry_seconds)


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, errors.ManagerError) else f"internal error ({type(exc).__name__}: {exc})"


class Reconciler:
    """Applies one declared-state file. poll() blocks (a worker thread runs it); run() drives it on the event loop."""

    def __init__(self, path: Path, ops: Operations, adapters: AdapterStore, poll_seconds: float, retry_seconds: float):
        self.path = path
        self.ops = ops
        self.store = ops.store
        self.adapters = adapters
        self.metrics = ops.metrics
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self._cancel = threading.Event()
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._state: DeclaredState | None = None
        self._seen: Fingerprint | None = None
        self._applied = ""
        self._file_error = ""
        self._entries: dict[str, EntryStatus] = {}
        self._running = False
        self._last_pass = self._last_success = 0.0
        self._last_pass_mono = 0.0
        self._models: dict[tuple[Any, ...], _Outcome] = {}
        self._adapters: set[tuple[Any, ...]] = set()
        self._progress: Progress | None = None
        self.metrics.declared_state_in_use()

    # ---- reading -----------------------------------------------------------------------------

    def status(self) -> ReconcileStatus:
        """A snapshot of the file's state and of every declared entry."""
        with self._lock:
            p = self._progress if self._running else None
            activity = (
                "" if p is None else f"{p.stage} {p.done_bytes}/{p.total_bytes} bytes" if p.total_bytes else p.stage
            )
            return ReconcileStatus(
                str(self.path), self._applied, self._running, self._file_error, self._last_pass,
                self._last_success, tuple(self._entries.values()), activity,
            )  # fmt: skip

    def ready(self) -> bool:
        """Whether the sidecar is ready to be relied on: a valid file was read, and the `default` alias (if the file
        declares one) points at a READY variant."""
        state = self._state
        if state is None:
            return False
        if state.alias("default") is None:
            return True
        target = next((t for r, t in self.store.aliases() if r.name == "default"), None)
        return target is not None and target.state == READY

    # ---- the file ----------------------------------------------------------------------------

    def poll(self) -> bool:
        """One check (blocking): applies a changed file, or retries failed entries once the retry interval has
        passed; returns whether a pass ran. Unchanged content is a no-op."""
        state = self._changed_file()
        if state is None:
            if not self._retry_due():
                return False
            state = self._state
            assert state is not None
            log.info("retrying the declared entries that failed", extra={"path": str(self.path)})
        counts = {"models": len(state.models), "aliases": len(state.aliases), "adapters": len(state.adapters)}
        attributes = {f"sdserve.declared.{what}": n for what, n in counts.items()}
        try:
            with self.ops.tracer.start_as_current_span("reconcile", attributes=attributes) as span:
                self._apply(state)
                span.set_attribute("sdserve.declared.sha256", self._applied)
        except errors.Cancelled:
            log.info("reconcile stopped", extra={"path": str(self.path)})
        return True

    def _changed_file(self) -> DeclaredState | None:
        """The parsed file when its content differs from what was applied; None otherwise (or when it is bad)."""
        try:
            fp, data = fingerprint(self.path)
        except OSError as exc:
            self._file_problem(errors.NotFound(f"cannot read {self.path}: {exc.strerror or exc}"))
            return None
        if fp == self._seen:
            return None
        self._seen = fp
        if fp.sha256 == self._applied:
            log.info("declared state file changed; its content did not", extra={"path": fp.path, "sha256": fp.sha256})
            self._set_file_error("")
            return None
        try:
            state = declared.parse(data)
        except declared.DeclaredStateError as exc:
            self._file_problem(errors.InvalidArgument(f"{self.path}: {exc}"), force=True)
            return None
        self._set_file_error("")
        log.info("declared state changed", extra={"path": fp.path, "sha256": fp.sha256})
        return state

    def _file_problem(self, exc: errors.ManagerError, force: bool = False) -> None:
        """Reports a file that cannot be used once (not on every poll); what was applied before stays."""
        if exc.message == self._file_error and not force:
            return
        self._set_file_error(exc.message)
        self.metrics.on_reconcile_error("file", exc)
        log.error("declared state file not applied; the last applied state stays", extra={"error": exc.message})

    def _set_file_error(self, message: str) -> None:
        with self._lock:
            self._file_error = message

    def _retry_due(self) -> bool:
        with self._lock:
            failed = any(e.state == FAILED for e in self._entries.values())
        return (
            failed
            and self._state is not None
            and self.retry_seconds > 0
            and time.monotonic() - self._last_pass_mono >= self.retry_seconds
        )

    # ---- a pass ------------------------------------------------------------------------------

    def _apply(self, state: DeclaredState) -> None:
        """One pass: every model (then the aliases pointing at it), then every adapter."""
        assert self._seen is not None
        self._state, self._applied = state, self._seen.sha256
        self.metrics.on_declared_applied(self._applied)
        # A shared read-only store: take in what was published into it since the last pass.
        self.store.rescan()
        self._begin(state)
        try:
            outcomes: dict[str, _Outcome | None] = {}
            for model in state.models:
                outcomes[model.name] = self._entry(
                    model.entry, model.name, "model", functools.partial(self._model, model)
                )
                self._update_pending(state, outcomes)
                # An alias moves once every model it points at has had its turn (a canary alias: its last one).
                done = [a for a in state.aliases if model.name in a.models and all(m in outcomes for m in a.models)]
                for alias in done:
                    self._entry(alias.entry, alias.name, "alias", functools.partial(self._alias, alias, outcomes))
            for adapter in state.adapters:
                self._entry(adapter.entry, adapter.name, "adapter", functools.partial(self._adapter, adapter))
        finally:
            self._end(state)

    def _begin(self, state: DeclaredState) -> None:
        entries = [(m.entry, m.name) for m in state.models] + [(a.entry, a.name) for a in state.adapters]
        entries += [(a.entry, a.name) for a in state.aliases]
        with self._lock:
            self._running = True
            self._entries = {e: EntryStatus(e, n, PENDING) for e, n in entries}
        self.metrics.reconcile_pending_models.set(len(state.models))

    def _update_pending(self, state: DeclaredState, outcomes: dict[str, _Outcome | None]) -> None:
        ready = sum(1 for m in state.models if (o := outcomes.get(m.name)) is not None and not o.error)
        self.metrics.reconcile_pending_models.set(len(state.models) - ready)

    def _end(self, state: DeclaredState) -> None:
        with self._lock:
            self._running, self._progress = False, None
            self._last_pass, self._last_pass_mono = time.time(), time.monotonic()
            failed = [e for e in self._entries.values() if e.state != OK]
            if not failed:
                self._last_success = self._last_pass
        self.metrics.reconcile_failed_entries.set(len(failed))
        self.metrics.reconcile_passes.labels("failed" if failed else "converged").inc()
        if not failed:
            self.metrics.reconcile_last_success.set(self._last_success)
        log.log(
            logging.WARNING if failed else logging.INFO,
            "declared state reconciled" if not failed else "declared state reconciled with failures",
            extra={
                "sha256": self._applied,
                "models": len(state.models),
                "adapters": len(state.adapters),
                "aliases": len(state.aliases),
                "failed": ", ".join(e.entry for e in failed),
            },
        )

    def _entry(self, entry: str, name: str, kind: str, work: Callable[[], tuple[T, str, str]]) -> T | None:
        """Runs one entry and records it (one log line); a failure is reported, never raised (Cancelled is)."""
        self._set_entry(EntryStatus(entry, name, RUNNING))
        attributes = {"sdserve.declared.entry": entry, "sdserve.declared.kind": kind, "sdserve.declared.name": name}
        try:
            with self.ops.tracer.start_as_current_span("reconcile.entry", attributes=attributes) as span:
                result, detail, problem = work()
                span.set_attribute("sdserve.outcome", "failed" if problem else "ok")
        except errors.Cancelled:
            raise
        except Exception as exc:
            if not isinstance(exc, errors.ManagerError):
                log.error("declared entry failed unexpectedly", extra={"entry": entry}, exc_info=exc)
            self.metrics.on_reconcile_error(kind, exc)
            self._report(EntryStatus(entry, name, FAILED, _message(exc)))
            return None
        self._report(EntryStatus(entry, name, FAILED if problem else OK, problem, detail))
        return result

    def _set_entry(self, status: EntryStatus) -> None:
        with self._lock:
            self._entries[status.entry] = status

    def _report(self, status: EntryStatus) -> None:
        self._set_entry(status)
        level = logging.WARNING if status.state == FAILED else logging.INFO
        extra = {"entry": status.entry, "entry_name": status.name, "state": status.state, "reason": status.reason}
        log.log(level, "declared entry", extra={**extra, "detail": status.detail})

    def _run(self, operation: Callable[[Reporter], T]) -> T:
        return operation(Reporter(self._on_progress, self._cancel, interval=1.0))

    def _on_progress(self, progress: Progress) -> None:
        self._progress = progress

    # ---- models ------------------------------------------------------------------------------

    def _model(self, model: DeclaredModel) -> tuple[_Outcome, str, str]:
        """Stores the model and its variants (unless a previous pass did and they are still READY), verifies them,
        and applies the pin. Returns (outcome, the ready variants, why a declared variant is missing)."""
        memo = (model.name, model.source, model.variants)
        known = self._models.get(memo)
        if known is not None and not known.error and self._still_ready(known):
            keys = dict(known.keys)
            problems: list[str] = []
        else:
            keys, problems = self._store_model(model)
        for variant, key in list(keys.items()):
            found = self.ops.verify_stored(key)
            if found:
                del keys[variant]
                problems.append(f"{key.label()} failed verification: {found[0]}")
                self.metrics.on_reconcile_error("model", errors.DataLoss(found[0]))
        if model.pin is not None and any(v.pinned != model.pin for v in self.store.variants(model.name)):
            self.store.pin(model.name, model.pin)
        outcome = _Outcome(keys, "; ".join(problems))
        self._models[memo] = outcome
        return outcome, ", ".join(k.label() for k in keys.values()), outcome.error

    def _still_ready(self, outcome: _Outcome) -> bool:
        return all((v := self.store.get(k)) is not None and v.state == READY for k in outcome.keys.values())

    def _store_model(self, model: DeclaredModel) -> tuple[dict[str, VariantKey], list[str]]:
        """Pulls or imports the model, then makes each declared variant the revision lacks (a read-only store:
        finds what it holds)."""
        if self.store.read_only:
            return self._find_stored(model)
        base = self._fetch(model)
        keys = {
            v.key.variant: v.key
            for v in (base.model, *base.also_published)
            if v.key.revision == base.model.key.revision
        }
        problems = []
        for variant in model.variants:
            if variant in keys:
                continue
            req = VariantRequest(model.name, variant, base.model.key.revision)
            try:
                keys[variant] = self._run(functools.partial(self.ops.create_variant, req)).model.key
            except errors.Cancelled:
                raise
            except errors.ManagerError as exc:
                self.metrics.on_reconcile_error("variant", exc)
                problems.append(f"variant {variant}: {exc.message}")
        return keys, problems

    def _find_stored(self, model: DeclaredModel) -> tuple[dict[str, VariantKey], list[str]]:
        """A read-only store's READY variants of the declared model (its newest revision; a Hub source pinned to a
        commit: that commit). FAILED_PRECONDITION when the store does not hold it."""
        src = model.source
        pinned = src.revision if isinstance(src, HubSource) and _is_commit(src.revision) else ""
        found = [v for v in self.store.variants(model.name) if v.state == READY and v.key.revision.startswith(pinned)]
        if not found:
            what = f"{model.name}@{pinned}" if pinned else model.name
            raise errors.FailedPrecondition(
                f"{what} is not in the read-only store {self.store.layout.root}; populate the shared store with it"
            )
        revision = found[0].key.revision  # variants() lists the newest revision first
        keys = {v.key.variant: v.key for v in found if v.key.revision == revision}
        problems = [f"variant {v}: not in the read-only store" for v in model.variants if v not in keys]
        return keys, problems

    def _fetch(self, model: DeclaredModel) -> OperationResult:
        src = model.source
        if isinstance(src, HubSource):
            pull = PullRequest(src.repo, src.revision, src.variant, model.name)
            return self._run(lambda rep: self.ops.pull(pull, rep))
        imp = ImportRequest(src.path, model.name, src.architecture, src.config_from)
        return self._run(lambda rep: self.ops.import_model(imp, rep))

    # ---- aliases and adapters ----------------------------------------------------------------

    def _alias(self, alias: DeclaredAlias, outcomes: dict[str, _Outcome | None]) -> tuple[None, str, str]:
        """Points the alias at its target (a canary alias: every target) if that is ready (stored and verified);
        otherwise it stays where it is."""
        current = next((r for r, _ in self.store.aliases() if r.name == alias.name), None)
        if alias.weighted:
            split = [(_ready_key(outcomes, m, v), w) for m, v, w in alias.weighted]
            if current is None or list(current.split) != split:
                targets = [(k.name, k.revision, k.variant, w) for k, w in split]
                self.ops.set_alias(alias.name, "", "", "", targets)
            return None, " | ".join(f"{k.label()}*{w}" for k, w in split), ""
        key = _ready_key(outcomes, alias.model, alias.variant)
        if current is None or current.key != key or current.split:
            self.ops.set_alias(alias.name, key.name, key.revision, key.variant)
        return None, key.label(), ""

    def _adapter(self, adapter: DeclaredAdapter) -> tuple[None, str, str]:
        """Pulls or imports the adapter (replacing a different one of the same name) unless it is stored already;
        a read-only store's adapter is verified where it is."""
        if self.store.read_only:
            return None, self.adapters.verify(adapter.name).manifest.source, ""
        memo = (adapter.name, adapter.source, adapter.token)
        if memo in self._adapters:
            with contextlib.suppress(errors.NotFound, errors.DataLoss):
                return None, self.adapters.verify(adapter.name).manifest.source, ""
            self._adapters.discard(memo)
        src = adapter.source
        if isinstance(src, HubSource):
            pull = check_pull(AdapterPull(src.repo, src.revision, src.filename, adapter.name, adapter.token, True))
            result = self._run(lambda rep: self.adapters.pull_adapter(pull, rep))
        else:
            imp = check_import(AdapterImport(src.path, adapter.name, adapter.token, True))
            result = self._run(lambda rep: self.adapters.import_adapter(imp, rep))
        self._adapters.add(memo)
        return None, result.adapter.manifest.source, ""

    # ---- the loop ----------------------------------------------------------------------------

    def _poll_safely(self) -> None:
        try:
            self.poll()
        except Exception:
            log.exception("declared state poll failed")

    async def run(self, report: Callable[[bool], Awaitable[None]]) -> None:
        """Polls the file every poll interval until close(); passes run in a worker thread, and readiness is
        reported (through `report`) every poll interval while one runs and after each."""
        self._wake = asyncio.Event()
        while not self._cancel.is_set():
            work = asyncio.ensure_future(asyncio.to_thread(self._poll_safely))
            while not work.done():
                await report(await asyncio.to_thread(self.ready))
                await asyncio.wait({work}, timeout=self.poll_seconds)
            await report(await asyncio.to_thread(self.ready))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    def close(self) -> None:
        """Stops polling; a running operation stops at its next check and cleans up."""
        self._cancel.set()
        if self._wake is not None:
            self._wake.set()


def _ready_key(outcomes: dict[str, _Outcome | None], model: str, variant: str) -> VariantKey:
    """The stored variant an alias target (`model`, optionally `variant`; empty: the best one) resolves to now;
    FAILED_PRECONDITION when it is not ready (the alias stays where it is)."""
    target = f"{model}:{variant}" if variant else model
    outcome = outcomes.get(model)
    if outcome is None:
        raise errors.FailedPrecondition(f"{target} is not ready (its model entry failed); the alias stays")
    if variant:
        key = outcome.keys.get(variant)
        if key is None:
            why = outcome.error or f"the model has {', '.join(outcome.keys) or 'no ready variant'}"
            raise errors.FailedPrecondition(f"{target} is not ready ({why}); the alias stays")
        return key
    if outcome.error or not outcome.keys:
        why = outcome.error or "no ready variant"
        raise errors.FailedPrecondition(f"{model} is not ready ({why}); the alias stays")
    return min(outcome.keys.values(), key=lambda k: Variant(k.variant).rank)


def _is_commit(revision: str) -> bool:
    """Whether a Hub revision is a full commit sha (not a branch or a tag)."""
    return len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
