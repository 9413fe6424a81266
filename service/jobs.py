"""A request in flight: its resolved parameters, its event stream and its cancellation flag."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from service import tracing
from service.models import ModelEntry
from service.requests import Event, Failed, Outcome, Progress, ResolvedRequest, Result


class Job:
    """Bridges the worker thread (which posts events) and the stream handler (which reads them)."""

    def __init__(
        self,
        resolved: ResolvedRequest,
        entry: ModelEntry,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None,
        max_queue_seconds: float = 0.0,
        on_finish: Callable[[Job, Event], None] | None = None,
        refiner: ModelEntry | None = None,
    ):
        self.resolved = resolved
        self.entry = entry
        # The refiner model of a request with a refiner pass (loaded on the worker when the pass starts).
        self.refiner = refiner
        # Longest wait in the queue before it fails without running; 0 means no limit.
        self.max_queue_seconds = max_queue_seconds
        self.loop = loop
        # Monotonic time after which the request must stop (the gRPC deadline), or None.
        self.deadline = deadline
        self.enqueued_at = time.monotonic()
        self.arrived_at = self.enqueued_at
        self.started_at: float | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._finished = threading.Event()
        self.outcome: Outcome | None = None
        # Denoising steps this job has finished, and whether its latents were decoded (the worker sets these).
        self.steps_done = 0
        self.decoded = False
        self.first_progress_at: float | None = None
        # Called once, from the posting thread, when the job reaches its terminal event.
        self._on_finish = on_finish
        # Where its spans go (the RPC span that admitted it), or None when it is not traced.
        self.trace = tracing.capture(resolved)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def post(self, event: Event) -> None:
        """Sends an event to the stream; terminal events finish the job. Safe from any thread."""
        if self._finished.is_set():
            return
        if isinstance(event, (Result, Failed)):
            self._finished.set()
            self.outcome = Outcome.OK if isinstance(event, Result) else event.outcome
            if self._on_finish is not None:
                self._on_finish(self, event)
        elif self.cancelled.is_set():
            return
        elif self.first_progress_at is None and isinstance(event, Progress):
            self.first_progress_at = time.monotonic()
        # RuntimeError: the event loop is closed; the server is gone and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def abort(self, event: Failed) -> None:
        """Ends the job now with `event` (shutdown); a running batch drops it at the next step."""
        self.cancelled.set()
        self.post(event)

    def cancel(self) -> None:
        """Marks the job cancelled; the worker stops it within one step or skips it if queued."""
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def should_stop(self, now: float) -> bool:
        return self.cancelled.is_set() or self.expired(now)

    def stop_event(self, now: float) -> Failed:
        """The terminal event for a job stopped by cancel or deadline."""
        if self.expired(now):
            return Failed(Outcome.DEADLINE, "deadline exceeded")
        return Failed(Outcome.CANCELLED, "cancelled by the client")
