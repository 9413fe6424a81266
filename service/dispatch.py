"""The bounded request queue the worker takes batches from."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from service.jobs import Job


class Overloaded(Exception):
    """The model's queue is full."""


class JobQueue:
    """FIFO of jobs, bounded per model; the worker takes the oldest job plus compatible ones."""

    def __init__(self, max_per_model: int):
        self._max = max_per_model
        self._cond = threading.Condition()
        self._items: list[Job] = []
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
        """Stops the queue; returns the jobs still waiting so the caller can fail them."""
        with self._cond:
            self._closed = True
            left, self._items = self._items, []
            self._cond.notify_all()
            return left

    def take(self, limit: Callable[[Job], int], wait_seconds: float) -> list[Job] | None:
        """Blocks for the oldest job, then gathers compatible ones up to `limit(job)` images.

        Waits up to `wait_seconds` for more compatible jobs while the batch is short. Returns None once
        closed and empty.
        """
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._items.pop(0)
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
