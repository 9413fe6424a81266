"""Request admission: looks a request's model up, binds it, queues it, and keeps the ledger of how requests ended."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid

from service import adapters, prompt_chunks
from service.adapters import AdapterCatalog
from service.device import DeviceChoice
from service.errors import Draining
from service.job_queue import JobQueue
from service.jobs import Job
from service.models import ModelEntry, ModelRegistry
from service.observers import Observer
from service.requests import Event, Failed, GenerationRequest, Outcome, Queued, ResolvedRequest, Task
from service.settings import Settings
from service.validation import bind


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """How one request ended: kept for introspection and tests (the last 10,000)."""

    request_id: str
    task: Task
    model: str
    outcome: Outcome
    started: bool
    queue_seconds: float
    steps_done: int
    decoded: bool


class Admission:
    """Accepts valid requests into the queue, tracks every active job, and records how each one ended.

    It only reads the registry; the model lifecycle changes it. `observer` hears of every finished request (and of
    the moment nothing is active), after the ledger has it."""

    def __init__(
        self,
        settings: Settings,
        choice: DeviceChoice,
        registry: ModelRegistry,
        queue: JobQueue,
        observer: Observer,
        adapters: AdapterCatalog | None = None,
    ):
        self._settings = settings
        self.adapters = adapters if adapters is not None else AdapterCatalog(settings.adapter_dirs)
        self._choice = choice
        self._registry = registry
        self._queue = queue
        self._observer = observer
        self._lock = threading.Lock()
        self._ledger: collections.deque[LedgerEntry] = collections.deque(maxlen=10_000)
        self._active: set[Job] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Stops admitting: every later submit raises Draining (UNAVAILABLE)."""
        self._draining = True

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop, deadline: float | None) -> Job:
        """Binds `req` to its model and queues it. Raises a ServiceError (Draining, ModelNotFound, ModelUnusable,
        InvalidRequest or Overloaded)."""
        if self._draining:
            raise Draining()
        max_queue = req.max_queue_seconds or self._settings.default_max_queue_seconds
        # Look up and register under one lock so a concurrent hot swap either sees this job on the old model
        # (and defers unloading it) or this job gets the new one.
        if not req.request_id:
            # Made here rather than in bind: a canary alias picks its target from the request id.
            req = dataclasses.replace(req, request_id=uuid.uuid4().hex)
        with self._lock:
            entry = self._registry.lookup(req.model, req.task, key=req.request_id)
            refiner = None
            if req.refiner is not None and entry.family == "sdxl":
                # (For other families bind refuses params.refiner itself, naming the model's family.)
                refiner = self._registry.lookup_refiner(req.refiner.model)
            resolved = bind(req, entry, self._choice, refiner)
            resolved = dataclasses.replace(
                self._with_adapters(resolved, entry), requested_model=req.model or self._registry.default
            )
            job = Job(resolved, entry, loop, deadline, max_queue, on_finish=self._finished, refiner=refiner)
            self._active.add(job)
        try:
            position = self._queue.put(job)
        except Exception:
            with self._lock:
                self._active.discard(job)
            raise
        job.post(Queued(position))
        return job

    def _with_adapters(self, resolved: ResolvedRequest, entry: ModelEntry) -> ResolvedRequest:
        """The request with the adapters that serve it and the text-encoder chunks its prompts take (both part of
        its batch key)."""
        req = resolved.request
        uses = adapters.resolve(self.adapters, req, entry.family, entry.base, entry.variant)
        chunks = prompt_chunks.count(entry.path, req, resolved.guidance_scale > 1.0, adapters.vocab(uses))
        return dataclasses.replace(resolved, adapters=uses, prompt_chunks=chunks)

    def cancel(self, job: Job) -> None:
        """Cancels `job`: dropped from the queue at once, or stopped within one step if running."""
        job.cancel()
        if self._queue.discard(job):
            job.post(Failed(Outcome.CANCELLED, "cancelled while queued"))

    def abort_all(self, event: Failed) -> int:
        """Ends every queued and running job with `event`; returns how many were ended."""
        with self._lock:
            jobs = list(self._active)
        for job in jobs:
            self._queue.discard(job)
            job.abort(event)
        return len(jobs)

    def _finished(self, job: Job, event: Event) -> None:
        entry = LedgerEntry(
            request_id=job.resolved.request_id,
            task=job.resolved.task,
            model=job.resolved.model,
            outcome=job.outcome or Outcome.INTERNAL,
            started=job.started_at is not None,
            queue_seconds=((job.started_at or time.monotonic()) - job.enqueued_at),
            steps_done=job.steps_done,
            decoded=job.decoded,
        )
        with self._lock:
            self._ledger.append(entry)
            self._active.discard(job)
            idle = not self._active
        self._observer.request_finished(job, event)
        if idle:
            self._observer.idle()

    def slots_in_use(self) -> set[str]:
        """Slots that a queued or running job holds (its model's, and its refiner's)."""
        with self._lock:
            held = {j.entry.slot for j in self._active}
            return held | {j.refiner.slot for j in self._active if j.refiner is not None}

    def active_count(self) -> int:
        with self._lock:
            return len(self._active)

    def in_flight(self) -> int:
        """Jobs that started on the device and have not finished."""
        with self._lock:
            return sum(1 for j in self._active if j.started_at is not None)

    def outcomes(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._ledger)

    def queue_depths(self) -> dict[str, int]:
        """Waiting requests per model (every known model, 0 when none wait)."""
        depths = dict.fromkeys((e.name for e in self._registry.entries()), 0)
        depths.update(self._queue.depth_by_model())
        return depths

    def stop(self) -> None:
        """Closes the queue, failing what still waits there."""
        for job in self._queue.close():
            job.post(Failed(Outcome.UNAVAILABLE, "the server is shutting down"))
