"""The inference engine: model registry, queue and device worker behind one submit() call."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from service import schedulers
from service.batching import MARGIN, BatchPolicy
from service.device import DeviceChoice
from service.dispatch import JobQueue
from service.jobs import Job
from service.models import ModelEntry, ModelRegistry
from service.prompt_cache import PromptCache
from service.requests import Event, Failed, GenerationRequest, Outcome, Queued, Task
from service.resolve import resolve
from service.runner import BatchStats
from service.settings import EMBEDDED_MODELS, Settings
from service.tiny import TINY_NAME, build_tiny
from service.worker import Worker, empty_device_cache

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "shapes"


def pick_default_model(settings: Settings, registry: ModelRegistry) -> str:
    """The configured default, else the embedded trained model, else the tiny model (built if needed)."""
    if settings.default_model:
        return settings.default_model
    if registry.slot_of("default"):
        # The model manager's `default` alias: moving it hot-swaps the default model.
        return "default"
    names = registry.names()
    if EMBEDDED_DEFAULT in names:
        return EMBEDDED_DEFAULT
    if TINY_NAME not in names:
        # Never write into the repository's own models/ (shipped, committed models only): use the last other
        # folder, which by default is the writable cache.
        embedded = EMBEDDED_MODELS.resolve()
        others = [d for d in settings.model_dirs if d.resolve() != embedded]
        target = others[-1] if others else Path.home() / ".cache" / "sdserve" / "models"
        log.info("building the tiny default model", extra={"folder": str(target / TINY_NAME)})
        build_tiny(target / TINY_NAME)
        registry.rescan()
    return TINY_NAME


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


class Engine:
    """Accepts validated requests, queues them and runs them on the device worker."""

    def __init__(self, settings: Settings, choice: DeviceChoice, registry: ModelRegistry):
        self.settings = settings
        self.choice = choice
        self.registry = registry
        self.queue = JobQueue(settings.max_queue)
        self.batching = BatchPolicy(settings.max_batch_images)
        self.batch_limit: Callable[[Job], int] = (
            self.batching.limit if settings.batch_policy == "measured" else lambda job: settings.max_batch_images
        )
        self.prompt_cache = PromptCache(settings.prompt_cache_bytes) if settings.prompt_cache_bytes > 0 else None
        self.worker = Worker(
            self.queue,
            registry,
            choice.type,
            self._limit_for,
            settings.batch_wait_ms / 1000.0,
            self.prompt_cache,
        )
        self.worker.batch_hooks.append(self._learn)
        self._ledger_lock = threading.Lock()
        self.ledger: collections.deque[LedgerEntry] = collections.deque(maxlen=10_000)
        self.finish_hooks: list[Callable[[Job, Event], None]] = []
        self._active: set[Job] = set()
        self.swap_hooks: list[Callable[[bool], None]] = []
        self._retiring: set[str] = set()
        # Called (from any thread) whenever the last active job finishes.
        self.on_idle: Callable[[], None] | None = None

    def active_count(self) -> int:
        with self._ledger_lock:
            return len(self._active)

    def in_flight(self) -> int:
        """Jobs that started on the device and have not finished."""
        with self._ledger_lock:
            return sum(1 for j in self._active if j.started_at is not None)

    def abort_all(self, event: Failed) -> int:
        """Ends every queued and running job with `event`; returns how many were ended."""
        with self._ledger_lock:
            jobs = list(self._active)
        for job in jobs:
            self.queue.discard(job)
            job.abort(event)
        return len(jobs)

    def _learn(self, jobs: list[Job], stats: BatchStats) -> None:
        if stats.steps >= 2:
            self.batching.observe(BatchPolicy.key_of(jobs[0]), stats.images, stats.step_seconds)

    def calibrate(self, entry: ModelEntry, steps: int = 3) -> None:
        """Measures per-image step time at the model's default size for batch sizes 1, 2, 4, ... up to the
        limit, so the batch policy starts from measurements instead of guesses."""
        if self.batching.max_images == 1 or self.settings.batch_policy != "measured":
            return
        model = self.registry.get_loaded(entry)
        key = (entry.identity, entry.default_width, entry.default_height)
        size = 1
        best = float("inf")
        while size <= self.batching.max_images:
            pipe = model.pipeline(Task.GENERATE, schedulers.build("", entry.scheduler_config))
            marks: list[float] = []

            def tick(p: Any, i: int, t: Any, kwargs: dict[str, Any], marks: list[float] = marks) -> dict[str, Any]:
                marks.append(time.perf_counter())
                return kwargs

            with torch.inference_mode():
                pipe(
                    prompt=[""] * size,
                    num_inference_steps=steps,
                    width=entry.default_width,
                    height=entry.default_height,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(size)],
                    output_type="latent",
                    callback_on_step_end=tick,
                )
            per_step = (marks[-1] - marks[0]) / (len(marks) - 1)
            self.batching.observe(key, size, per_step, "calibrated")
            per_image = per_step / size
            if size > 1 and per_image >= best * MARGIN:
                # Not faster per image than a smaller batch: larger ones won't be either, and on big latents
                # each further size costs seconds of start-up.
                break
            best = min(best, per_image)
            size *= 2
        log.info("batch sizes calibrated", extra={"model": entry.name, "limits": str(self.batching.limits())})

    def _limit_for(self, job: Job) -> int:
        # Late-bound so a batching policy installed after construction takes effect.
        return self.batch_limit(job)

    def _finished(self, job: Job, event: Event) -> None:
        started = job.started_at is not None
        entry = LedgerEntry(
            request_id=job.resolved.request_id,
            task=job.resolved.task,
            model=job.resolved.model,
            outcome=job.outcome or Outcome.INTERNAL,
            started=started,
            queue_seconds=((job.started_at or time.monotonic()) - job.enqueued_at),
            steps_done=job.steps_done,
            decoded=job.decoded,
        )
        with self._ledger_lock:
            self.ledger.append(entry)
            self._active.discard(job)
            idle = not self._active
            in_use = {j.entry.slot for j in self._active}
            done = {s for s in self._retiring if s not in in_use}
            self._retiring -= done
        for slot_id in done:
            if slot_id not in self.registry.referenced():
                self._unload(slot_id)
        for hook in self.finish_hooks:
            hook(job, event)
        if idle and self.on_idle is not None:
            self.on_idle()

    def outcomes(self) -> list[LedgerEntry]:
        with self._ledger_lock:
            return list(self.ledger)

    def start(self) -> None:
        """Picks the default model, optionally loads and warms it, and starts the worker."""
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.registry.default_model = pick_default_model(self.settings, self.registry)
        if self.settings.preload_default:
            entry = self.registry.resolve("", Task.GENERATE)
            self.warm_up(entry)
            if self.settings.calibrate_batching:
                self.calibrate(entry)
        self.worker.start()

    def swap(self, alias: str, entry: ModelEntry) -> bool:
        """Hot swap: loads `entry` beside what `alias` serves now and warms it with one step, then points
        the alias at it atomically. Jobs already holding the old model finish on it; the old model is
        unloaded once nothing points at it (its memory goes when the last such job ends). A failed load
        leaves the alias where it was. Call from a thread other than the worker's.

        The folder's files are verified against its manifest.json first (sdserve_core.manifest.verify_folder;
        digests cached by stat): a mismatch fails the swap before anything is loaded. After a failed swap
        `self.last_swap_error` says why (one line naming the file and the rule when files are at fault)."""
        from sdserve_core.manifest import verify_folder

        self.last_swap_error = ""
        if self.registry.slot_of(alias) == entry.slot:
            return True
        start = time.perf_counter()
        problems = verify_folder(entry.path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self.last_swap_error = f"its files do not match manifest.json: {problems[0]}{more}"
            log.error(
                "hot swap refused: the files do not match the manifest; the alias keeps its model",
                extra={"alias": alias, "target": entry.slot, "problems": problems},
            )
            self.record_swap(False)
            return False
        self.registry.upsert(entry)
        try:
            self.warm_up(entry)
        except Exception as exc:
            try:
                _state, load_error = self.registry.state(entry.slot)
            except KeyError:
                load_error = ""
            # A failed load keeps the loader's own reason on the slot; ModelUnusable only says that it failed.
            self.last_swap_error = load_error or f"{type(exc).__name__}: {exc}"
            log.error(
                "hot swap failed; the alias keeps its model",
                extra={"alias": alias, "target": entry.slot, "error": self.last_swap_error},
            )
            self.record_swap(False)
            return False
        before = self.registry.set_alias(alias, entry.slot)
        log.info(
            "hot swap done",
            extra={"alias": alias, "from": before or "", "to": entry.slot, "seconds": time.perf_counter() - start},
        )
        if before and before != entry.slot:
            self.release(before)
        self.record_swap(True)
        return True

    def release(self, slot_id: str) -> None:
        """Unloads a slot once no alias or the default points at it and no queued or running job uses it
        (such jobs finish on it first; the last one to end unloads it)."""
        if slot_id in self.registry.referenced():
            return
        with self._ledger_lock:
            if any(j.entry.slot == slot_id for j in self._active):
                self._retiring.add(slot_id)
                return
        self._unload(slot_id)

    def _unload(self, slot_id: str) -> None:
        entry = next((e for e in self.registry.entries() if e.slot == slot_id), None)
        if self.registry.unload(slot_id):
            if entry is not None and self.prompt_cache is not None:
                self.prompt_cache.drop(entry.identity)
            gc.collect()
            empty_device_cache(self.choice.type)
            log.info("model unloaded", extra={"model": slot_id})

    def record_swap(self, ok: bool) -> None:
        for hook in self.swap_hooks:
            hook(ok)

    def warm_up(self, entry: ModelEntry) -> float:
        """Loads `entry` and runs one denoising step at its default size; returns the seconds taken."""
        start = time.perf_counter()
        model = self.registry.get_loaded(entry)
        pipe = model.pipeline(
            Task.INPAINT if Task.GENERATE not in entry.tasks else Task.GENERATE,
            schedulers.build("", entry.scheduler_config),
        )
        size = (entry.default_width, entry.default_height)
        common: dict[str, Any] = {
            "prompt": "",
            "num_inference_steps": 1,
            "width": size[0],
            "height": size[1],
            "generator": torch.Generator("cpu").manual_seed(0),
            "output_type": "pil",
        }
        with torch.inference_mode():
            if Task.GENERATE in entry.tasks:
                pipe(**common)
            else:
                pipe(**common, image=Image.new("RGB", size), mask_image=Image.new("L", size, 255), strength=1.0)
        return time.perf_counter() - start

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop, deadline: float | None) -> Job:
        """Resolves and queues `req`. Raises ModelNotFound, ModelUnusable, InvalidForModel or Overloaded."""
        max_queue = req.max_queue_seconds or self.settings.default_max_queue_seconds
        # Resolve and register under one lock so a concurrent hot swap either sees this job on the old
        # model (and defers unloading it) or this job resolves to the new one.
        with self._ledger_lock:
            entry = self.registry.resolve(req.model, req.task)
            resolved = resolve(req, entry, self.choice)
            job = Job(resolved, entry, loop, deadline, max_queue)
            job.on_finish = self._finished
            self._active.add(job)
        try:
            position = self.queue.put(job)
        except Exception:
            with self._ledger_lock:
                self._active.discard(job)
            raise
        job.post(Queued(position))
        return job

    def cancel(self, job: Job) -> None:
        """Cancels `job`: dropped from the queue at once, or stopped within one step if running."""
        job.cancel()
        if self.queue.discard(job):
            job.post(Failed(Outcome.CANCELLED, "cancelled while queued"))

    def stop(self, timeout: float | None = None) -> None:
        """Closes the queue (failing what waits), lets the running batch finish, joins the worker."""
        for job in self.queue.close():
            job.post(Failed(Outcome.UNAVAILABLE, "the server is shutting down"))
        self.worker.join(timeout)

    def supported_schedulers(self) -> list[str]:
        return list(schedulers.SCHEDULERS)
