"""The bounded request queue the device worker takes batches from, and the device work that goes before them."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from service.errors import Overloaded
from service.jobs import Job


class DeviceWork:
    """A function to run on the device worker's thread (warm-up, calibration), with its result as a future."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:
            self.future.set_exception(exc)


class JobQueue:
    """FIFO of jobs, bounded per model; the worker takes the oldest job plus compatible ones. Device work goes
    before any job."""

    def __init__(self, max_per_model: int):
        self._max = max_per_model
        self._cond = threading.Condition()
        self._items: list[Job] = []
        self._work: list[DeviceWork] = []
        self._closed = False

    def put(self, job: Job) -> int:
        """Adds `job`; returns its position (0 = next). Raises Overloaded when its model's queue is full."""
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            same = sum(1 for j in self._items if j.resolved.model == job.resolved.model)
            if same >= self._max:
                raise Overloaded(f"the queue for model {job.resolved.model!r} is full ({self._max} requests)")
            self._items.append(job)
            self._cond.notify_all()
            return len(self._items) - 1

    def put_work(self, work: DeviceWork) -> None:
        """Queues device work ahead of every job; once the queue is closed it fails at once."""
        with self._cond:
            if self._closed:
                work.future.set_exception(RuntimeError("the device worker has stopped"))
                return
            self._work.append(work)
            self._cond.notify_all()

    def discard(self, job: Job) -> bool:
        """Removes a queued job (cancelled before it ran); False when it already left the queue."""
        with self._cond:
            try:
                self._items.remove(job)
            except ValueError:
                return False
            return True

    def depth(self) -> int:
        with self._cond:
            return len(self._items)

    def wait_depth(self, depth: int, timeout: float) -> bool:
        """Blocks until at least `depth` jobs wait (or `timeout` passes); True when they do."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._items) >= depth, timeout)

    def depth_by_model(self) -> dict[str, int]:
        with self._cond:
            out: dict[str, int] = {}
            for j in self._items:
                out[j.resolved.model] = out.get(j.resolved.model, 0) + 1
            return out

    def close(self) -> list[Job]:
        """Stops the queue; returns the jobs still waiting so the caller can fail them (device work still runs)."""
        with self._cond:
            self._closed = True
            left, self._items = self._items, []
            self._cond.notify_all()
            return left

    def take(self, limit: Callable[[Job], int], wait_seconds: float) -> list[Job] | DeviceWork | None:
        """Blocks for device work or the oldest job; for a job, gathers compatible ones up to `limit(job)` images,
        waiting up to `wait_seconds` for more while the batch is short. Returns None once closed and empty."""
        with self._cond:
            while not self._items and not self._work:
                if self._closed:
                    return None
                self._cond.wait()
            if self._work:
                return self._work.pop(0)
            return self._gather(self._items.pop(0), limit, wait_seconds)

    def _gather(self, first: Job, limit: Callable[[Job], int], wait_seconds: float) -> list[Job]:
        """The batch that starts with `first` (called with the condition held)."""
        cap = max(limit(first), first.resolved.num_images)
        batch = [first]
        images = first.resolved.num_images
        key = first.resolved.batch_key()
        deadline = time.monotonic() + wait_seconds
        while True:
            for j in list(self._items):
                if images >= cap:
                    break
                if j.resolved.batch_key() == key and images + j.resolved.num_images <= cap:
                    self._items.remove(j)
                    batch.append(j)
                    images += j.resolved.num_images
            remaining = deadline - time.monotonic()
            if images >= cap or remaining <= 0 or self._closed:
                return batch
            self._cond.wait(remaining)
