"""Progress reporting and cancellation for long operations running in worker threads."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from model_manager import errors


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report (see OperationProgress in the proto)."""

    stage: str
    file: str = ""
    done_bytes: int = 0
    total_bytes: int = 0
    resumed_bytes: int = 0
    message: str = ""


class Reporter:
    """Counts bytes per stage and emits at most one report per `interval` seconds, plus every stage start and end."""

    def __init__(self, emit: Callable[[Progress], None], cancel: threading.Event | None = None, interval: float = 0.1):
        self._emit = emit
        self.cancel = cancel or threading.Event()
        self._interval = interval
        self._lock = threading.Lock()
        self._current = Progress("starting")
        self._last = 0.0

    def check(self) -> None:
        """Raises Cancelled once the caller has gone away."""
        if self.cancel.is_set():
            raise errors.Cancelled("the operation was cancelled")

    def stage(self, stage: str, total_bytes: int = 0, message: str = "") -> None:
        self.check()
        with self._lock:
            self._current = Progress(stage, total_bytes=total_bytes, message=message)
        self._send(force=True)

    def file(self, name: str) -> None:
        with self._lock:
            self._current = dataclasses.replace(self._current, file=name)
        self._send(force=False)

    def advance(self, nbytes: int, resumed: bool = False) -> None:
        self.check()
        with self._lock:
            cur = self._current
            self._current = dataclasses.replace(
                cur, done_bytes=cur.done_bytes + nbytes, resumed_bytes=cur.resumed_bytes + (nbytes if resumed else 0)
            )
        self._send(force=False)

    def finish_stage(self) -> None:
        self._send(force=True)

    def _send(self, force: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self._interval:
                return
            self._last = now
            report = self._current
        self._emit(report)


def silent() -> Reporter:
    """A reporter that reports nowhere (for internal steps and tests)."""
    return Reporter(lambda _p: None)
