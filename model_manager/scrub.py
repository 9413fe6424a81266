"""The periodic scrub: every interval, re-reads every READY variant's files and marks mismatches CORRUPT."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from model_manager.metrics import ManagerMetrics
from model_manager.store import ScrubReport, Store

log = logging.getLogger(__name__)


class Scrubber:
    """Runs Store.scrub every `interval_s` seconds on a daemon thread (0: never), first one interval after start.

    Reading bypasses the hash cache, so it also finds bytes that changed without their stat changing (bit rot).
    A variant it marks CORRUPT sends a `model_corrupted` event and moves its aliases back (see Store.check_variant).
    """

    def __init__(self, store: Store, interval_s: float, metrics: ManagerMetrics):
        self.store = store
        self.interval_s = interval_s
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # More checks each scrub runs after the store's, each returning (checked, corrupt): the stored adapters.
        self.also: list[Callable[[threading.Event], tuple[int, int]]] = []
        metrics.scrub_interval.set(interval_s)

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="model-manager-scrub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:
                log.exception("scrub failed")

    def run_once(self) -> ScrubReport:
        """One scrub now (one at a time); updates the scrub metrics and logs the outcome."""
        with self._lock:
            report = self.store.scrub(self._stop)
            for check in self.also:
                checked, corrupt = check(self._stop)
                level = logging.ERROR if corrupt else logging.INFO
                log.log(level, "adapter scrub done", extra={"checked": checked, "corrupt": corrupt})
            self.metrics.on_scrub(report, time.time())
        level = logging.ERROR if report.corrupt else logging.INFO
        log.log(
            level,
            "scrub done",
            extra={
                "checked": report.checked,
                "corrupt": report.corrupt,
                "bytes": report.bytes,
                "seconds": round(report.seconds, 3),
            },
        )
        return report
