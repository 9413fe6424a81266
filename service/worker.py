"""The thread that owns the device: runs device work (warm-up, calibration) and batches of jobs from the queue."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from sdserve_core import memory, profiles
from sdserve_core.memory import MemoryPlan, MemoryPolicy
from sdserve_core.pipeline import adapters as lora_calls
from sdserve_core.profiles import Profile
from service import adapters, batch_call, tracing
from service.adapters import AdapterPool
from service.errors import INTERNAL, OUT_OF_MEMORY, ServiceError, to_failed
from service.execution import ProfileBook
from service.job_queue import DeviceWork, JobQueue
from service.jobs import Job
from service.models import LoadedModel, ModelRegistry
from service.observers import Observer
from service.prompt_cache import PromptCache
from service.requests import Failed, Outcome, Started

log = logging.getLogger(__name__)
T = TypeVar("T")


def empty_device_cache(device_type: str) -> None:
    """Returns cached device memory to the driver (after an out-of-memory error or an unload)."""
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device_type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    elif device_type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        torch.xpu.empty_cache()


class DeviceWorker:
    """Runs device work and queued jobs, one batch at a time, on the one thread that uses the device."""

    def __init__(
        self,
        queue: JobQueue,
        registry: ModelRegistry,
        device_type: str,
        batch_limit: Callable[[Job], int],
        batch_wait_seconds: float,
        cache: PromptCache | None,
        observer: Observer,
        memory: MemoryPolicy | None = None,
        adapters: AdapterPool | None = None,
        profiles: ProfileBook | None = None,
    ):
        self._queue = queue
        # The execution profile of each loaded model; None: every call runs exact.
        self._profiles = profiles
        # LoRAs loaded into models (least recently used unloaded first); None: one that never unloads.
        self._adapters = adapters if adapters is not None else AdapterPool(1 << 62, observer)
        self._memory = memory or MemoryPolicy()
        self._registry = registry
        self._device_type = device_type
        self._limit = batch_limit
        self._wait = batch_wait_seconds
        self._cache = cache
        # Told after each pipeline call that ran, with its jobs and what it measured.
        self._observer = observer
        self._thread = threading.Thread(target=self._loop, name="sdserve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the worker's thread, ahead of queued jobs and never beside a batch, and returns its result
        (or raises its exception). Blocks the caller; on the worker's own thread it runs at once."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        work = DeviceWork(fn)
        self._queue.put_work(work)
        result: T = work.future.result()
        return result

    def _loop(self) -> None:
        while (taken := self._queue.take(self._limit, self._wait)) is not None:
            if isinstance(taken, DeviceWork):
                taken.run()
            else:
                self._run(taken)

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

    @staticmethod
    def _post_started(live: list[Job]) -> None:
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
                    refiner=None if r.refiner is None else r.refiner.identity,
                    memory_strategy=r.memory_strategy,
                    adapters=r.adapters,
                    execution_profile=r.execution_profile,
                    requested_model=r.requested_model,
                )
            )

    def _run(self, batch: list[Job]) -> None:
        live = self._admit(batch)
        if not live:
            return
        stats: batch_call.BatchStats | None = None
        try:
            # Loaded before Started: the memory plan needs the model's VAE, and a model that fails to load never
            # starts the request.
            model = self._registry.get_loaded(live[0].entry)
            refiner = live[0].refiner
            refined = None if refiner is None else self._registry.get_loaded(refiner)
            plan = self._plan(model, live)
            uses = live[0].resolved.adapters
            # Loaded (and verified) before Started too: a LoRA that does not fit never starts the request.
            loras = self._adapters.prepare(model.components, model.name, uses)
            vocab = adapters.vocab(uses)
            # LoRAs at scale 0 change nothing: the batch keeps the model's profile (an ONNX or compiled UNet),
            # else its images would differ from plain ones in the last bits.
            profile = self._profile(model, live, bool(lora_calls.changing(loras)))
            for job in live:
                job.resolved = dataclasses.replace(
                    job.resolved, memory_strategy=plan.label(), execution_profile=profile.name
                )
            self._post_started(live)
            tracing.queued(live)
            stats = batch_call.run_batch(
                model, live, self._cache, refined, plan, batch_call.Adapters(loras, vocab), profile
            )
        except Exception as exc:
            self._fail(live, self._failure(live, exc))
        finally:
            self._fail(live, Failed(Outcome.INTERNAL, "internal error: the request ended without a result"))
            if stats is not None:
                self._observer.batch_ran(live, stats)

    def _profile(self, model: LoadedModel, live: list[Job], with_loras: bool) -> Profile:
        """The batch's execution profile (choosing the model's first, when it was loaded by a request)."""
        if self._profiles is None:
            return profiles.EXACT
        self._profiles.ensure(model)
        return self._profiles.profile_for(live[0].resolved, adapters=with_loras)

    def _plan(self, model: LoadedModel, live: list[Job]) -> MemoryPlan:
        """The memory strategies of the batch's pipeline calls: from its size, its image count and the device's
        free memory now (sdserve_core.memory)."""
        first = live[0].resolved
        return memory.plan(
            self._memory,
            device_type=self._device_type,
            free_bytes=memory.free_device_bytes(model.choice.device),
            width=first.width,
            height=first.height,
            images=sum(j.resolved.num_images for j in live),
            vae=model.components.vae,
        )

    def _failure(self, live: list[Job], exc: Exception) -> Failed:
        """How a failed pipeline call ends its jobs (logged here; mapped by service.errors)."""
        failed = to_failed(exc)
        if failed is OUT_OF_MEMORY:
            log.warning("device out of memory", extra={"model": live[0].resolved.model, "batch": len(live)})
            empty_device_cache(self._device_type)
        elif failed is INTERNAL and not isinstance(exc, ServiceError):
            log.exception("pipeline failed", extra={"model": live[0].resolved.model})
        return failed

    @staticmethod
    def _fail(jobs: list[Job], event: Failed) -> None:
        for job in jobs:
            if not job.finished:
                job.post(event)
