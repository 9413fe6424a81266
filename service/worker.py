"""The thread that owns the device: takes batches from the queue and runs them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from service import runner
from service.dispatch import JobQueue
from service.jobs import Job
from service.models import ModelRegistry, ModelUnusable
from service.prompt_cache import PromptCache
from service.requests import Failed, Outcome, Started

log = logging.getLogger(__name__)


def is_oom(exc: BaseException) -> bool:
    """Device out-of-memory: torch's OutOfMemoryError (CUDA, XPU) or a failed CPU/MPS allocation."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def empty_device_cache(device_type: str) -> None:
    """Returns cached device memory to the driver after an out-of-memory error."""
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device_type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    elif device_type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()


class Worker:
    """Runs queued jobs one batch at a time on one device."""

    def __init__(
        self,
        queue: JobQueue,
        registry: ModelRegistry,
        device_type: str,
        batch_limit: Callable[[Job], int],
        batch_wait_seconds: float,
        cache: PromptCache | None = None,
    ):
        self._queue = queue
        self._registry = registry
        self._device_type = device_type
        self._limit = batch_limit
        self._wait = batch_wait_seconds
        self._cache = cache
        # Called after each pipeline call that ran, with its jobs and what it measured.
        self.batch_hooks: list[Callable[[list[Job], runner.BatchStats], None]] = []
        self._thread = threading.Thread(target=self._loop, name="sdserve-worker", daemon=True)
        self.busy = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (batch := self._queue.take(self._limit, self._wait)) is not None:
            self.busy.set()
            try:
                self._run(batch)
            finally:
                self.busy.clear()

    def _admit(self, batch: list[Job]) -> list[Job]:
        """Drops jobs that were cancelled, expired or waited too long; marks the rest started."""
        now = time.monotonic()
        live = []
        for job in batch:
            waited = now - job.enqueued_at
            if job.should_stop(now):
                job.post(job.stop_event(now))
            elif job.max_queue_seconds and waited > job.max_queue_seconds:
                job.post(
                    Failed(
                        Outcome.DEADLINE,
                        f"waited {waited:.3f} s in the queue, longer than max_queue_seconds "
                        f"({job.max_queue_seconds:g} s); it did not run",
                    )
                )
            else:
                job.started_at = now
                live.append(job)
        return live

    def _run(self, batch: list[Job]) -> None:
        live = self._admit(batch)
        if not live:
            return
        for job in live:
            r = job.resolved
            job.post(
                Started(
                    seeds=r.seeds,
                    model=r.model,
                    model_revision=r.model_revision,
                    request_id=r.request_id,
                    queue_seconds=(job.started_at or job.enqueued_at) - job.enqueued_at,
                    batch_size=len(live),
                    model_variant=r.variant,
                    dtype=r.dtype,
                )
            )
        stats: runner.BatchStats | None = None
        try:
            model = self._registry.get_loaded(live[0].entry)
            stats = runner.run_batch(model, live, self._cache)
        except ModelUnusable as exc:
            self._fail(live, Failed(Outcome.UNAVAILABLE_MODEL, str(exc)))
        except Exception as exc:
            if is_oom(exc):
                log.warning("device out of memory", extra={"model": live[0].resolved.model, "batch": len(live)})
                empty_device_cache(self._device_type)
                self._fail(
                    live,
                    Failed(
                        Outcome.OOM,
                        "out of device memory: the request did not fit; retry with fewer or smaller images",
                        (),
                        1.0,
                    ),
                )
            else:
                log.exception("pipeline failed", extra={"model": live[0].resolved.model})
                self._fail(live, Failed(Outcome.INTERNAL, "internal error"))
        finally:
            self._fail(live, Failed(Outcome.INTERNAL, "internal error: the request ended without a result"))
            if stats is not None:
                for hook in self.batch_hooks:
                    hook(live, stats)

    @staticmethod
    def _fail(jobs: list[Job], event: Failed) -> None:
        for job in jobs:
            if not job.finished:
                job.post(event)
