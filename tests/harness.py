"""Test harness: tiny models built from configs, and a real server on port 0 in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.admission import LedgerEntry
from service.jobs import Job
from service.observers import Observer
from service.requests import Event
from service.server import Server
from service.settings import Settings
from service.tiny import build_tiny

TINY = "tiny-sd"
TINY_INPAINT = "tiny-sd-inpainting"


def build_models(folder: Path) -> Path:
    """Builds the 4-channel and 9-channel tiny models into `folder` (idempotent)."""
    build_tiny(folder / TINY, seed=0)
    build_tiny(folder / TINY_INPAINT, seed=10, in_channels=9)
    return folder


class Recorder(Observer):
    """Records what a test server reports (finished requests, hot swaps, lease renewals) so tests can wait for it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.finished: set[str] = set()
        self.swaps: list[bool] = []
        self.leased: list[frozenset[str]] = []

    def request_finished(self, job: Job, event: Event) -> None:
        with self.cond:
            self.finished.add(job.resolved.request_id)
            self.cond.notify_all()

    def swap_finished(self, alias: str, ok: bool) -> None:
        with self.cond:
            self.swaps.append(ok)
            self.cond.notify_all()

    def leases_renewed(self, slots: frozenset[str]) -> None:
        with self.cond:
            self.leased.append(slots)
            self.cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 120.0) -> None:
        """Blocks until predicate(self) holds (checked under the lock after every report)."""
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), timeout), "timed out waiting for the server"

    def wait_swaps(self, count: int, timeout: float = 120.0) -> list[bool]:
        """The results of the first `count` hot swaps, waiting for them."""
        self.wait_for(lambda r: len(r.swaps) >= count, timeout)
        with self.cond:
            return list(self.swaps)


class ServerThread:
    """A real sdserve Server running on its own event loop in a daemon thread; `recorder` hears what it reports."""

    def __init__(self, settings: Settings, tracer_provider: Any = None):
        self.settings = settings
        # An OpenTelemetry TracerProvider for the server's spans (tests/test_tracing.py); None: tracing off.
        self.tracer_provider = tracer_provider
        self.recorder = Recorder()
        self.loop = asyncio.new_event_loop()
        self.server: Server | None = None
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Server(self.settings, observers=[self.recorder], tracer_provider=self.tracer_provider)
            self.port = self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def make_settings(models: Path, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=0,
        model_dirs=(models,),
        default_model=TINY,
        log_format="text",
        preload_default=True,
        metrics_port=-1,
        # Tests compare pixels with direct diffusers calls: a machine whose CPU has a faster profile (native
        # bfloat16) must not change them. Tests of profile choice ask for auto themselves.
        execution_profile="exact",
    )
    return dataclasses.replace(base, **overrides)


def running(models: Path, **overrides: Any) -> Iterator[ServerThread]:
    srv = ServerThread(make_settings(models, **overrides)).start()
    try:
        yield srv
    finally:
        srv.stop()


serving = contextlib.contextmanager(running)
"""`with serving(models, **overrides) as srv:` — a real server for the block."""


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic input image: smooth colour gradients plus a square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h - 2, 1)], -1)
    arr = arr.astype(np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


def sample_mask(w: int = 64, h: int = 64) -> Image.Image:
    """A mask whose white (repaint) part is a box in the lower right."""
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 2 : h - 8, w // 2 : w - 8] = 255
    return Image.fromarray(arr, mode="L")


def wait_ledger(server: ServerThread, request_id: str, timeout: float = 60.0) -> LedgerEntry:
    """Waits until the server has recorded `request_id`'s terminal outcome (reported to the test's recorder)."""
    assert server.server is not None
    server.recorder.wait_for(lambda r: request_id in r.finished, timeout)
    entries = [e for e in server.server.admission.outcomes() if e.request_id == request_id]
    assert len(entries) == 1, entries
    return entries[0]


def requests_counted(srv: ServerThread, **labels: str) -> float:
    """The sum of `sdserve_requests_total` over the series matching `labels` (e.g. transport="connect")."""
    assert srv.server is not None
    total = 0.0
    for metric in srv.server.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "sdserve_requests_total" and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_until(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """Polls `predicate` until true (bounded): the server accounts for a call just after its stream ends."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def connect_frame(message: bytes, flags: int = 0) -> bytes:
    """One Connect streaming envelope: a flags byte, the big-endian length, the message."""
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


def connect_unframe(data: bytes) -> list[tuple[int, bytes]]:
    """A Connect stream's envelopes as (flags, message) pairs; flags 2 marks the end-of-stream message."""
    out, i = [], 0
    while i < len(data):
        size = int.from_bytes(data[i + 1 : i + 5], "big")
        out.append((data[i], data[i + 5 : i + 5 + size]))
        i += 5 + size
    return out
