"""Prometheus metrics of the model-manager sidecar; gauges of the store and the process are read at scrape time."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model_manager import errors
from model_manager.names import Variant
from model_manager.store import CORRUPT, READY, AliasSet, Change, Corrupted, Removed, ScrubReport, Store

OPERATIONS = ("pull", "import", "create_variant", "pull_adapter", "import_adapter")
# Why an operation failed. Every value is fixed here: no repository id, name or message ever becomes a label.
REASONS = (
    "network",
    "checksum",
    "corrupt",
    "not_found",
    "denied",
    "budget",
    "disk_full",
    "cancelled",
    "invalid",
    "conflict",
    "other",
)
VARIANTS = tuple(v.value for v in Variant)
# The declared-state reconciler's labels: what failed (never its name: the log line names the entry), and passes.
RECONCILE_KINDS = ("file", "model", "variant", "adapter", "alias")
RECONCILE_RESULTS = ("converged", "failed")
STATES = (READY, CORRUPT)
VARIANT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

_REASON_BY_ERROR: tuple[tuple[type[errors.ManagerError], str], ...] = (
    (errors.ChecksumMismatch, "checksum"),
    (errors.DataLoss, "corrupt"),
    (errors.BudgetExceeded, "budget"),
    (errors.DiskFull, "disk_full"),
    (errors.Cancelled, "cancelled"),
    (errors.NotFound, "not_found"),
    (errors.PermissionDenied, "denied"),
    (errors.Unavailable, "network"),
    (errors.InvalidArgument, "invalid"),
    (errors.AlreadyExists, "conflict"),
    (errors.FailedPrecondition, "conflict"),
)


def failure_reason(exc: BaseException) -> str:
    """The bounded `reason` label of a failed operation."""
    for kind, reason in _REASON_BY_ERROR:
        if isinstance(exc, kind):
            return reason
    return "other"


class ManagerMetrics:
    """Every metric the sidecar exports, in its own registry (one per ManagerServer)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._register_operation_metrics(self.registry)
        self._register_event_metrics(self.registry)
        self._register_scrub_metrics(self.registry)
        self._register_reconcile_metrics(self.registry)
        self._in_flight = dict.fromkeys(OPERATIONS, 0)
        self._watchers = 0
        self._lock = threading.Lock()
        self._create_zero_series()

    def _register_operation_metrics(self, r: CollectorRegistry) -> None:
        """Outcomes of pull, import and create_variant operations, downloaded bytes, failures and variant timings."""
        self.operations = Counter(
            "sdserve_manager_operations",
            "Finished pull, import and create_variant operations by outcome (ok or a failure reason: "
            + ", ".join(REASONS)
            + ").",
            ["operation", "outcome"],
            registry=r,
        )
        self.downloaded_bytes = Counter(
            "sdserve_manager_downloaded_bytes",
            "Bytes received from the Hub (resumed bytes already on disk are not counted again).",
            registry=r,
        )
        self.download_failures = Counter(
            "sdserve_manager_download_failures",
            "Failed PullModel operations by reason (" + ", ".join(REASONS) + ").",
            ["reason"],
            registry=r,
        )
        self.checksum_failures = Counter(
            "sdserve_manager_checksum_failures",
            "Files whose bytes did not match their expected size or digest (Hub sha256 or git blob id, or the "
            "manifest checked before publishing); nothing was published.",
            registry=r,
        )
        self.variant_seconds = Histogram(
            "sdserve_manager_variant_creation_seconds",
            "Time to convert or quantize the weights of a new variant (without hashing and quality measurement).",
            ["variant"],
            buckets=VARIANT_BUCKETS,
            registry=r,
        )

    def _register_event_metrics(self, r: CollectorRegistry) -> None:
        """Counters of store events (evictions, corrupt variants found, alias reverts) and of refused calls."""
        self.evictions = Counter(
            "sdserve_manager_evictions", "Variants evicted to keep the store within its budget.", registry=r
        )
        self.evicted_bytes = Counter(
            "sdserve_manager_evicted_bytes", "Bytes of the variants evicted from the store.", registry=r
        )
        self.unauthenticated = Counter(
            "sdserve_manager_unauthenticated_calls",
            "Calls refused for a missing or wrong API key, by RPC.",
            ["rpc"],
            registry=r,
        )
        self.corrupt_found = Counter(
            "sdserve_manager_corrupt_variants_found",
            "Published variants later found not to match their manifest (by a scrub, a SetAlias check or a "
            "server's report) and marked CORRUPT; each counted once.",
            registry=r,
        )
        self.alias_reverts = Counter(
            "sdserve_manager_alias_reverts",
            "Aliases moved back to their previous target because their target failed (corrupt, or a server could "
            "not load it).",
            registry=r,
        )

    def _register_scrub_metrics(self, r: CollectorRegistry) -> None:
        """Scrub runs, bytes read, and the time, duration and corrupt finds of the last scrub."""
        self.scrub_runs = Counter("sdserve_manager_scrub_runs", "Completed scrubs of the store.", registry=r)
        self.scrub_read_bytes = Counter(
            "sdserve_manager_scrub_read_bytes", "Bytes of stored files read and hashed by scrubs.", registry=r
        )
        self.scrub_last_time = Gauge(
            "sdserve_manager_scrub_last_run_timestamp_seconds",
            "Unix time the last scrub finished; 0 until the first one.",
            registry=r,
        )
        self.scrub_last_seconds = Gauge(
            "sdserve_manager_scrub_last_duration_seconds", "How long the last scrub took.", registry=r
        )
        self.scrub_last_corrupt = Gauge(
            "sdserve_manager_scrub_last_corrupt_variants",
            "Variants the last scrub found not matching their manifest (and marked CORRUPT).",
            registry=r,
        )
        self.scrub_interval = Gauge(
            "sdserve_manager_scrub_interval_seconds",
            "Seconds between scrubs (--scrub-interval-seconds; 0: off).",
            registry=r,
        )

    def _register_reconcile_metrics(self, r: CollectorRegistry) -> None:
        """Progress and drift of the declared state (--declared-state): passes, failed entries, pending models."""
        self.reconcile_passes = Counter(
            "sdserve_manager_reconcile_passes",
            "Reconcile passes of the declared state by result (converged, or failed: some entry did not converge).",
            ["result"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "sdserve_manager_reconcile_errors",
            "Declared entries that failed to reconcile, by kind ("
            + ", ".join(RECONCILE_KINDS)
            + ") and reason ("
            + ", ".join(REASONS)
            + "); the log line of the entry names it.",
            ["kind", "reason"],
            registry=r,
        )
        self.reconcile_last_success = Gauge(
            "sdserve_manager_reconcile_last_success_timestamp_seconds",
            "Unix time the last reconcile pass ended with every declared entry converged; 0 until then.",
            registry=r,
        )
        self.reconcile_pending_models = Gauge(
            "sdserve_manager_reconcile_pending_models",
            "Declared models that are not stored, made and verified yet (pending or failed).",
            registry=r,
        )
        self.reconcile_failed_entries = Gauge(
            "sdserve_manager_reconcile_failed_entries",
            "Declared entries (models, adapters, aliases) whose last reconcile failed.",
            registry=r,
        )
        self.declared_state_info = Gauge(
            "sdserve_manager_declared_state_applied",
            "1 for the content (sha256, first 12 hex digits) of the declared-state file the sidecar last applied; "
            "compare across pods to watch a change converge.",
            ["sha256"],
            registry=r,
        )

    def declared_state_in_use(self) -> None:
        """Creates the reconcile pass series (exported as 0 before the first pass) once a declared state is used."""
        for result in RECONCILE_RESULTS:
            self.reconcile_passes.labels(result)

    def on_reconcile_error(self, kind: str, exc: BaseException) -> None:
        """Counts one failed declared entry (kind is fixed by the reconciler; the reason is bounded)."""
        self.reconcile_errors.labels(kind, failure_reason(exc)).inc()

    def on_declared_applied(self, sha256: str) -> None:
        """Shows which declared-state content this sidecar applies now (one series at a time)."""
        self.declared_state_info.clear()
        self.declared_state_info.labels(sha256[:12]).set(1)

    def _create_zero_series(self) -> None:
        """Creates every (operation, outcome) and failure-reason series, so each is exported as 0 before it happens."""
        for op in OPERATIONS:
            for outcome in ("ok", *REASONS):
                self.operations.labels(op, outcome)
        for reason in REASONS:
            self.download_failures.labels(reason)

    @contextlib.contextmanager
    def operation(self, kind: str) -> Iterator[None]:
        """Counts one running operation and, when it ends, its outcome."""
        with self._lock:
            self._in_flight[kind] += 1
        try:
            yield
        except BaseException as exc:
            reason = failure_reason(exc)
            self.operations.labels(kind, reason).inc()
            if kind in ("pull", "pull_adapter"):
                self.download_failures.labels(reason).inc()
            if isinstance(exc, errors.ChecksumMismatch):
                self.checksum_failures.inc()
            raise
        else:
            self.operations.labels(kind, "ok").inc()
        finally:
            with self._lock:
                self._in_flight[kind] -= 1

    @contextlib.contextmanager
    def timed_variant(self, variant: str) -> Iterator[None]:
        """Observes the duration of a successful variant conversion."""
        start = time.monotonic()
        yield
        self.variant_seconds.labels(variant).observe(time.monotonic() - start)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Counts one open WatchModels stream."""
        with self._lock:
            self._watchers += 1
        try:
            yield
        finally:
            with self._lock:
                self._watchers -= 1

    def watchers(self) -> int:
        with self._lock:
            return self._watchers

    def on_store_change(self, change: Change) -> None:
        """A Store listener: counts evictions, corrupt finds and alias reverts (called under the store's lock, so it
        only increments)."""
        event = change.event
        if isinstance(event, Removed) and event.reason == "evicted":
            self.evictions.inc()
            self.evicted_bytes.inc(event.variant.size_bytes)
        elif isinstance(event, Corrupted):
            self.corrupt_found.inc()
        elif isinstance(event, AliasSet) and event.reverted:
            self.alias_reverts.inc()

    def on_scrub(self, report: ScrubReport, finished_at: float) -> None:
        """Records one finished scrub."""
        self.scrub_runs.inc()
        self.scrub_read_bytes.inc(report.bytes)
        self.scrub_last_time.set(finished_at)
        self.scrub_last_seconds.set(report.seconds)
        self.scrub_last_corrupt.set(report.corrupt)

    def on_unauthenticated(self, method: str) -> None:
        """ApiKeyInterceptor's reject hook; `method` is a registered RPC, so the label stays bounded."""
        self.unauthenticated.labels(method.rsplit("/", 1)[-1]).inc()

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class StoreCollector(Collector):
    """Store bytes, budget, free disk, stored variants, aliases, running operations and memory, at scrape time."""

    def __init__(self, store: Store, metrics: ManagerMetrics, adapters: Callable[[], tuple[int, int]] | None = None):
        self._store = store
        self._metrics = metrics
        # (stored adapters, their bytes), read at scrape time; None: not exported.
        self._adapters = adapters
        self._process = psutil.Process(os.getpid())

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        yield from self._space()
        yield self._stored_models()
        yield GaugeMetricFamily("sdserve_manager_aliases", "Aliases in the store.", value=len(self._store.aliases()))
        yield from self._leases()
        yield from self._activity()
        if self._adapters is not None:
            count, nbytes = self._adapters()
            yield GaugeMetricFamily(
                "sdserve_manager_stored_adapters", "Stored adapters (LoRA and embeddings).", value=count
            )
            yield GaugeMetricFamily(
                "sdserve_manager_adapter_bytes", "Bytes of the stored adapters' weights files.", value=nbytes
            )

    def _space(self) -> Iterator[Metric]:
        """Store bytes, budget, protected and partial bytes, and the free space of its file system."""
        usage = self._store.usage()
        gauges = (
            ("sdserve_manager_store_bytes", "Bytes of the published variants in the store.", usage.used_bytes),
            (
                "sdserve_manager_store_budget_bytes",
                "The store's budget (--max-store-bytes); 0: none.",
                usage.budget_bytes,
            ),
            (
                "sdserve_manager_store_protected_bytes",
                "Bytes of pinned, aliased or in-use variants, which eviction may not remove.",
                usage.protected_bytes,
            ),
            (
                "sdserve_manager_partial_download_bytes",
                "Bytes of partial downloads kept for resuming.",
                usage.partial_bytes,
            ),
            ("sdserve_manager_disk_free_bytes", "Free bytes on the store's file system.", usage.free_bytes),
            (
                "sdserve_manager_min_free_bytes",
                "Free space the sidecar keeps on the store's file system (--min-free-bytes).",
                self._store.min_free_bytes,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))

    def _stored_models(self) -> Metric:
        """Stored variants by state and variant, every combination present (0 when none)."""
        counts = {(s, v): 0 for s in STATES for v in VARIANTS}
        for stored in self._store.variants():
            key = (stored.state, stored.key.variant)
            if key in counts:
                counts[key] += 1
        models = GaugeMetricFamily(
            "sdserve_manager_stored_models", "Stored variants by state and variant.", labels=["state", "variant"]
        )
        for (state, variant), n in counts.items():
            models.add_metric([state, variant], n)
        return models

    def _leases(self) -> Iterator[Metric]:
        """Servers holding leases, and the stored variants they hold them on."""
        holders, leased = self._store.lease_counts()
        yield GaugeMetricFamily(
            "sdserve_manager_lease_holders", "Servers holding unexpired leases on stored variants.", value=holders
        )
        yield GaugeMetricFamily(
            "sdserve_manager_leased_variants",
            "Stored variants that servers hold leases on (loaded or aliased there; never evicted).",
            value=leased,
        )

    def _activity(self) -> Iterator[Metric]:
        """Running operations, open watch streams and the process's resident memory."""
        running = GaugeMetricFamily(
            "sdserve_manager_operations_in_flight", "Pull, import and variant operations running.", labels=["operation"]
        )
        for op, n in self._metrics.in_flight().items():
            running.add_metric([op], n)
        yield running
        yield GaugeMetricFamily(
            "sdserve_manager_watch_streams",
            "Open WatchModels streams (servers following the store).",
            value=self._metrics.watchers(),
        )
        yield GaugeMetricFamily(
            "sdserve_manager_process_resident_memory_bytes",
            "Resident set size of the sidecar process.",
            value=self._process.memory_info().rss,
        )


def stop_http(server: Any) -> None:
    """Stops a server returned by sdserve_core.startup.serve_metrics."""
    server.shutdown()
    server.server_close()
