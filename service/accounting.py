"""Records what happened, in one place: the Prometheus metrics of requests, batches, loads and swaps, and the
access log line of every finished RPC."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Any

from service.batch_call import BatchStats
from service.jobs import Job
from service.metrics import ServerMetrics
from service.models import ModelEntry
from service.observers import Observer
from service.requests import Event, GenerationRequest, Outcome, Result, Task

log = logging.getLogger("service.servicer")


def _raw_request_id(request: Any) -> str:
    """The caller's request id as sent (already validated or not), for log lines of refused requests."""
    rid = getattr(getattr(request, "params", None), "request_id", "")
    return rid if isinstance(rid, str) and len(rid) <= 128 and rid.isprintable() else ""


class Accounting(Observer):
    """Observes the server's work into its metrics, and writes one access-log line per generation RPC."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics

    def request_finished(self, job: Job, event: Event) -> None:
        r = job.resolved
        labels = (r.model, r.task.value)
        m = self._m
        if job.started_at is not None:
            m.queue_seconds.labels(*labels).observe(job.started_at - job.enqueued_at)
        if isinstance(event, Result):
            m.inference_seconds.labels(*labels).observe(time.monotonic() - (job.started_at or job.enqueued_at))
            m.images.labels(*labels).inc(len(event.images))
        if job.first_progress_at is not None:
            m.first_progress_seconds.labels(*labels).observe(job.first_progress_at - job.arrived_at)

    def batch_ran(self, jobs: list[Job], stats: BatchStats) -> None:
        model = jobs[0].resolved.model
        self._m.batch_requests.labels(model).observe(len(jobs))
        self._m.batch_images.labels(model).observe(stats.images)
        self._m.memory_calls.labels(model, jobs[0].resolved.memory_strategy).inc()
        if stats.steps:
            self._m.step_seconds.labels(model, jobs[0].resolved.execution_profile).observe(stats.step_seconds)

    def model_loaded(self, entry: ModelEntry, seconds: float) -> None:
        self._m.model_load_seconds.labels(entry.name).observe(seconds)

    def swap_finished(self, alias: str, ok: bool) -> None:
        self._m.swaps.labels("ok" if ok else "failed").inc()

    def prompt_cache_lookup(self, hit: bool) -> None:
        self._m.prompt_cache.labels("hit" if hit else "miss").inc()

    def adapter_lookup(self, hit: bool) -> None:
        self._m.adapter_lookups.labels("hit" if hit else "miss").inc()

    def adapter_evicted(self) -> None:
        self._m.adapter_evictions.inc()

    def adapter_cache(self, nbytes: int, entries: int) -> None:
        self._m.adapter_bytes.set(nbytes)
        self._m.adapter_entries.set(entries)

    def unauthenticated(self, method: str, transport: str = "grpc") -> None:
        """A call the API-key check refused."""
        rpc = method.rsplit("/", 1)[-1]
        self._m.requests.labels(rpc, "unknown", "", "", Outcome.UNAUTHENTICATED.value, transport).inc()

    def rpc_finished(
        self,
        rpc: str,
        task: Task,
        labels: tuple[str, str],
        request: Any,
        req: GenerationRequest | None,
        job: Job | None,
        outcome: Outcome,
        arrived: float,
        transport: str = "grpc",
    ) -> None:
        """Counts a finished generation RPC and writes its access-log line; `labels` are its (model, variant)."""
        model, variant = labels
        elapsed = time.monotonic() - arrived
        self._m.requests.labels(rpc, model, variant, task.value, outcome.value, transport).inc()
        self._m.request_seconds.labels(rpc, outcome.value, transport).observe(elapsed)
        fields: dict[str, object] = {
            "rpc": rpc,
            "transport": transport,
            "model": model,
            "variant": variant,
            "outcome": outcome.value,
            "total_seconds": round(elapsed, 4),
            "request_id": _raw_request_id(request) or uuid.uuid4().hex,
        }
        if job is not None:
            fields.update(_job_fields(job))
        if req is not None:
            fields.update(
                prompt_chars=len(req.prompt),
                prompt_sha256=hashlib.sha256(req.prompt.encode()).hexdigest()[:16],
                negative_chars=len(req.negative_prompt),
            )
        level = logging.ERROR if outcome is Outcome.INTERNAL else logging.INFO
        log.log(level, "request", extra=fields)


def _job_fields(job: Job) -> dict[str, object]:
    """The access-log fields of a request that was queued."""
    r = job.resolved
    return {
        "request_id": r.request_id,
        "revision": r.model_revision,
        "dtype": r.dtype,
        "steps": r.steps,
        "images": r.num_images,
        "width": r.width,
        "height": r.height,
        "scheduler": r.scheduler_name,
        "queue_seconds": round(((job.started_at or time.monotonic()) - job.enqueued_at), 4),
        "steps_done": job.steps_done,
    }
