"""The restructured core's seams, with real parts: device work runs on the worker thread and never beside a batch,
the lifecycle's one unload path drops weights and cached prompts, and every exception maps to one outcome."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.status import FieldViolation
from service import device, status
from service.batching import BatchPolicy
from service.errors import (
    INTERNAL,
    OUT_OF_MEMORY,
    Draining,
    InvalidRequest,
    ModelNotFound,
    ModelUnusable,
    Overloaded,
    to_failed,
)
from service.job_queue import DeviceWork, JobQueue
from service.lifecycle import ModelLifecycle
from service.models import ModelRegistry, ModelState
from service.observers import Observer
from service.prompt_cache import PromptCache, cache_key
from service.requests import Outcome, Task
from service.server import SERVICE_NAME
from service.settings import Settings
from service.worker import DeviceWorker
from tests.harness import TINY, ServerThread, make_settings


class Parts:
    """A registry, queue, device worker and lifecycle over the tiny models, as the server wires them."""

    def __init__(self, models: Path):
        self.settings: Settings = make_settings(models, calibrate_batching=False)
        self.choice = device.choose("cpu", "float32")
        self.registry = ModelRegistry((models,), self.choice)
        self.queue = JobQueue(4)
        self.cache = PromptCache(1 << 26)
        self.in_use: set[str] = set()
        self.worker = DeviceWorker(self.queue, self.registry, "cpu", lambda job: 1, 0.0, self.cache, Observer())
        self.lifecycle = ModelLifecycle(
            self.settings,
            self.choice,
            self.registry,
            self.worker,
            BatchPolicy(1),
            self.cache,
            Observer(),
            in_use=lambda: set(self.in_use),
        )
        self.worker.start()

    def close(self) -> None:
        self.queue.close()
        self.worker.join(10)


@pytest.fixture()
def parts(models_dir: Path) -> Iterator[Parts]:
    p = Parts(models_dir)
    try:
        yield p
    finally:
        p.close()


def test_warm_up_runs_on_the_device_worker_thread(parts: Parts) -> None:
    entry = parts.registry.lookup(TINY, Task.GENERATE)
    model = parts.registry.get_loaded(entry)
    threads: list[str] = []
    hook = model.components.unet.register_forward_pre_hook(  # type: ignore[attr-defined]
        lambda *_: threads.append(threading.current_thread().name)
    )
    try:
        parts.lifecycle.warm_up(entry)
    finally:
        hook.remove()
    assert threads and set(threads) == {"sdserve-worker"}, threads


def test_device_work_goes_before_queued_jobs_and_never_beside_a_running_one() -> None:
    queue = JobQueue(4)
    order: list[str] = []
    running = threading.Event()
    release = threading.Event()

    def long_work() -> None:
        order.append("first started")
        running.set()
        release.wait(30)
        order.append("first ended")

    first = DeviceWork(long_work)
    queue.put_work(first)
    taker_results: list[object] = []

    def take_all() -> None:
        while (item := queue.take(lambda job: 1, 0.0)) is not None:
            assert isinstance(item, DeviceWork)
            item.run()
            taker_results.append(item.future.result())

    taker = threading.Thread(target=take_all)
    taker.start()
    assert running.wait(30)

    def second_work() -> str:
        order.append("second")
        return "done"

    second = DeviceWork(second_work)
    queue.put_work(second)
    # The second piece of work cannot start while the first holds the (only) taker.
    assert not second.future.done()
    release.set()
    assert second.future.result(30) == "done"
    queue.close()
    taker.join(30)
    assert order == ["first started", "first ended", "second"]
    closed = DeviceWork(lambda: None)
    queue.put_work(closed)
    with pytest.raises(RuntimeError, match="stopped"):
        closed.future.result(1)


def test_the_one_unload_path_drops_weights_and_cached_prompts(parts: Parts) -> None:
    entry = parts.registry.lookup(TINY, Task.GENERATE)
    parts.registry.get_loaded(entry)
    key = cache_key(entry.identity, PromptInputs("a prompt"), True)
    parts.cache.get(key, lambda: PromptEmbeds(torch.zeros(1, 4, 8)))
    assert len(parts.cache) == 1
    parts.lifecycle.forget(entry.slot)
    assert len(parts.cache) == 0
    assert parts.registry.slot_of(TINY) is None


def test_release_waits_for_the_last_job_holding_the_slot(parts: Parts) -> None:
    entry = parts.registry.lookup(TINY, Task.GENERATE)
    parts.registry.get_loaded(entry)
    parts.in_use.add(entry.slot)
    parts.lifecycle.release(entry.slot)
    assert parts.registry.state(entry.slot)[0] is ModelState.LOADED
    parts.in_use.clear()
    # The end of the last request that held it unloads it (the lifecycle observes finished requests).
    parts.lifecycle.request_finished(None, None)  # type: ignore[arg-type]
    assert parts.registry.state(entry.slot)[0] is ModelState.ON_DISK


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (InvalidRequest([FieldViolation("params.steps", "must be at most 150; got 151")]), Outcome.INVALID),
        (ModelNotFound("nope"), Outcome.NOT_FOUND),
        (ModelUnusable("model 'x' failed to load"), Outcome.FAILED_PRECONDITION),
        (Overloaded("the queue for model 'x' is full (4 requests)"), Outcome.OVERLOADED),
        (Draining(), Outcome.UNAVAILABLE),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), Outcome.OOM),
        (torch.OutOfMemoryError("CUDA out of memory"), Outcome.OOM),
        (ValueError("something deep inside diffusers"), Outcome.INTERNAL),
        (asyncio.InvalidStateError("anything else"), Outcome.INTERNAL),
    ],
)
def test_every_exception_maps_to_one_outcome_and_status(exc: BaseException, outcome: Outcome) -> None:
    failed = to_failed(exc)
    assert failed.outcome is outcome
    code, message, _trailers = status.rich_status(failed)
    assert code is status.CODES[outcome]
    if outcome is Outcome.INTERNAL:
        # Nothing of the exception reaches the caller.
        assert failed is INTERNAL and str(exc) not in message
    if outcome is Outcome.OOM:
        assert failed is OUT_OF_MEMORY and failed.retry_after_seconds > 0
    if isinstance(exc, InvalidRequest):
        assert failed.violations and "params.steps" in message


def test_every_outcome_has_a_status_code() -> None:
    assert set(status.CODES) == set(Outcome)


@pytest.mark.parametrize("service", ["", SERVICE_NAME, "liveness"])
def test_health_watch_streams_through_the_edge(server: ServerThread, service: str) -> None:
    """The health service's Watch writes its replies through the context (not a generator); the edge interceptor
    must pass those through, as kubelet-style watchers and `grpc_health_probe -watch` use it."""
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
