"""The model lifecycle: the default model, loads, hot swaps, warm-up, calibration and the one unload path. It is the
only writer of the model registry."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sdserve_core.manifest import verify_folder
from sdserve_core.pipeline import run as pipeline
from sdserve_core.profiles import Profile
from service import schedulers
from service.aliases import Weighted
from service.batching import MARGIN, BatchPolicy
from service.device import DeviceChoice
from service.execution import ProfileBook
from service.jobs import Job
from service.models import LoadedModel, ModelEntry, ModelRegistry, ModelState
from service.observers import Observer
from service.prompt_cache import PromptCache
from service.requests import Event, Task
from service.settings import EMBEDDED_MODELS, Settings
from service.tiny import TINY_NAME, build_tiny
from service.worker import DeviceWorker, empty_device_cache

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "shapes"


@dataclasses.dataclass(frozen=True)
class SwapResult:
    """How a hot swap ended: `ok` when the alias moved; otherwise `error` says why in one line."""

    ok: bool
    error: str = ""
    # A canary swap: the target that could not serve.
    failed: str = ""


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


class ModelLifecycle(Observer):
    """Loads, swaps, warms and unloads models. Device work (warm-up, calibration) runs on the device worker.

    A slot that an alias stops pointing at is unloaded once no queued or running job holds it: the lifecycle
    hears of finished requests as an observer and unloads it when its last job ends."""

    def __init__(
        self,
        settings: Settings,
        choice: DeviceChoice,
        registry: ModelRegistry,
        worker: DeviceWorker,
        batching: BatchPolicy,
        cache: PromptCache | None,
        observer: Observer,
        in_use: Callable[[], set[str]],
        profiles: ProfileBook | None = None,
    ):
        self._settings = settings
        self._profiles = profiles if profiles is not None else ProfileBook(settings, choice.type)
        self._choice = choice
        self._registry = registry
        self._worker = worker
        self._batching = batching
        self._cache = cache
        self._observer = observer
        self._in_use = in_use
        self._lock = threading.Lock()
        self._retiring: set[str] = set()

    # Reading -------------------------------------------------------------------------------------

    @property
    def device_type(self) -> str:
        """The device's kind ("cpu", "cuda", "mps", "xpu"): which variant a bare stored-model name means."""
        return self._choice.type

    def entries(self) -> list[ModelEntry]:
        return self._registry.entries()

    def slot_of(self, name: str) -> str | None:
        return self._registry.slot_of(name)

    def is_canary(self, alias: str) -> bool:
        """Whether `alias` is split between weighted targets (service.aliases)."""
        return alias in self._registry.weighted_aliases()

    def referenced(self) -> set[str]:
        """Slots an alias or the default points at."""
        return self._registry.referenced()

    def held(self) -> set[str]:
        """Slots whose weights are loaded or loading now."""
        out = set()
        for entry in self._registry.entries():
            try:
                state, _ = self._registry.state(entry.slot)
            except KeyError:
                continue
            if state in (ModelState.LOADED, ModelState.LOADING):
                out.add(entry.slot)
        return out

    # Start-up ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Picks the default model and, when configured, loads it, warms it and calibrates batch sizes, all on the
        device worker: no other thread runs torch meanwhile (a second live OpenMP thread team on a small CPU slows
        the worker's steps and would skew the calibration; see service/threads.py)."""
        self._worker.run(self._start)

    def _start(self) -> None:
        if self._settings.torch_threads:
            torch.set_num_threads(self._settings.torch_threads)
        self._registry.set_default(pick_default_model(self._settings, self._registry))
        if self._settings.preload_default:
            entry = self._registry.lookup("", Task.GENERATE)
            self.warm_up(entry)
            self._profiles.ensure(self._registry.get_loaded(entry))
            if self._settings.calibrate_batching:
                self.calibrate(entry)

    # Store changes (the model-manager watcher) ---------------------------------------------------------

    def publish(self, entry: ModelEntry, names: Iterable[str]) -> None:
        """Serves `entry` under its slot and `names` (a stored variant the model manager made ready)."""
        self._registry.upsert(entry, names=names)

    def forget(self, slot: str) -> None:
        """Stops serving a slot whose files are gone: unloads and forgets it, unless an alias or the default still
        points at it (it is served from memory until that moves)."""
        if slot in self._registry.referenced():
            return
        self._unload(slot)
        self._registry.remove(slot)

    def unserve(self, slot: str) -> None:
        """Stops serving a corrupt slot: its weights are dropped now (jobs holding them finish). If an alias or the
        default points at it, the slot stays, so requests load it again, which verifies its files and fails
        (FAILED_PRECONDITION naming the file) until it is repaired or the alias moves."""
        self._unload(slot)
        if slot not in self._registry.referenced():
            self._registry.remove(slot)

    def remove_alias(self, alias: str) -> None:
        for before in self._registry.remove_alias(alias):
            self.release(before)

    def refuse_swap(self, alias: str, target: str, reason: str) -> None:
        """Records a hot swap that could not even start (its target unreadable); the alias keeps its model."""
        log.error(
            "alias target unreadable; the alias keeps its model",
            extra={"alias": alias, "target": target, "error": reason},
        )
        self._observer.swap_finished(alias, False)

    # Hot swap --------------------------------------------------------------------------------------

    def swap(self, alias: str, entry: ModelEntry) -> SwapResult:
        """Hot swap: loads `entry` beside what `alias` serves now and warms it with one step on the device worker,
        then points the alias at it atomically. Jobs already holding the old model finish on it; the old model is
        unloaded once nothing points at it and its last job ended. A failed swap leaves the alias where it was.
        Call from a thread other than the worker's.

        The folder's files are verified against its manifest.json first (digests cached by stat): a mismatch fails
        the swap before anything is loaded."""
        if not self.is_canary(alias) and self._registry.slot_of(alias) == entry.slot:
            return SwapResult(True)
        start = time.perf_counter()
        error = self._prepare(alias, entry)
        if error:
            self._observer.swap_finished(alias, False)
            return SwapResult(False, error)
        before = self._registry.set_alias(alias, entry.slot)
        self._swapped(alias, before, {entry.slot}, start)
        return SwapResult(True)

    def swap_weighted(self, alias: str, targets: list[tuple[ModelEntry, int]]) -> SwapResult:
        """Hot swap to a canary alias: every target is verified, loaded and warmed as `swap` does for one, then the
        alias is split between them by weight atomically. A target that cannot serve fails the swap (its slot in
        `failed`) and the alias stays as it was. Call from a thread other than the worker's."""
        wanted: Weighted = tuple((e.slot, w) for e, w in targets)
        if self._registry.weighted_aliases().get(alias) == wanted:
            return SwapResult(True)
        start = time.perf_counter()
        for entry, _ in targets:
            error = self._prepare(alias, entry)
            if error:
                self._observer.swap_finished(alias, False)
                return SwapResult(False, error, entry.slot)
        before = self._registry.set_weighted(alias, wanted)
        self._swapped(alias, before, {e.slot for e, _ in targets}, start)
        return SwapResult(True)

    def _swapped(self, alias: str, before: set[str], after: set[str], start: float) -> None:
        """Logs a finished hot swap and releases the slots the alias no longer points at."""
        log.info(
            "hot swap done",
            extra={
                "alias": alias,
                "from": ",".join(sorted(before)),
                "to": ",".join(sorted(after)),
                "seconds": time.perf_counter() - start,
            },
        )
        for slot in before - after:
            self.release(slot)
        self._observer.swap_finished(alias, True)

    def _prepare(self, alias: str, entry: ModelEntry) -> str:
        """Verifies, loads and warms a swap's target; returns why it cannot serve ("" when it can)."""
        problems = verify_folder(entry.path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.error(
                "hot swap refused: the files do not match the manifest; the alias keeps its model",
                extra={"alias": alias, "target": entry.slot, "problems": problems},
            )
            return f"its files do not match manifest.json: {problems[0]}{more}"
        self._registry.upsert(entry)
        try:
            self.warm_up(entry)
            model = self._registry.get_loaded(entry)
            # The swap's target serves in its own profile from its first request: chosen before the alias moves.
            self._worker.run(lambda: self._profiles.ensure(model))
        except Exception as exc:
            try:
                _state, load_error = self._registry.state(entry.slot)
            except KeyError:
                load_error = ""
            # A failed load keeps the loader's own reason on the slot; ModelUnusable only says that it failed.
            error = load_error or f"{type(exc).__name__}: {exc}"
            log.error(
                "hot swap failed; the alias keeps its model",
                extra={"alias": alias, "target": entry.slot, "error": error},
            )
            return error
        return ""

    # Unloading ---------------------------------------------------------------------------------------

    def release(self, slot: str) -> None:
        """Unloads a slot once no alias or the default points at it and no queued or running job holds it (such
        jobs finish on it first; the end of the last one unloads it)."""
        if slot in self._registry.referenced():
            return
        with self._lock:
            if slot in self._in_use():
                self._retiring.add(slot)
                return
        self._unload(slot)

    def request_finished(self, job: Job, event: Event) -> None:
        """Unloads retiring slots that the finished request was the last to hold."""
        with self._lock:
            if not self._retiring:
                return
            in_use = self._in_use()
            done = {s for s in self._retiring if s not in in_use}
            self._retiring -= done
        for slot in done:
            if slot not in self._registry.referenced():
                self._unload(slot)

    def _unload(self, slot: str) -> None:
        """The one unload path: drops the weights and their cached prompt embeddings and returns device memory."""
        entry = next((e for e in self._registry.entries() if e.slot == slot), None)
        if self._registry.unload(slot):
            if entry is not None and self._cache is not None:
                self._cache.drop(entry.identity)
            if entry is not None:
                self._profiles.forget(entry.identity)
            gc.collect()
            empty_device_cache(self._choice.type)
            log.info("model unloaded", extra={"model": slot})

    # Device work ------------------------------------------------------------------------------------

    def warm_up(self, entry: ModelEntry) -> float:
        """Loads `entry` (on the calling thread: a hot swap loads beside serving) and runs one denoising step at its
        default size on the device worker; returns the seconds taken."""
        start = time.perf_counter()
        model = self._registry.get_loaded(entry)
        self._worker.run(lambda: _one_step(model, entry))
        return time.perf_counter() - start

    def calibrate(self, entry: ModelEntry, steps: int = 3) -> None:
        """Measures per-image step time at the model's default size for batch sizes 1, 2, 4, ... up to the limit,
        so the batch policy starts from measurements instead of guesses (run on the device worker)."""
        if self._batching.max_images == 1 or self._settings.batch_policy != "measured":
            return
        if Task.GENERATE not in entry.tasks:
            # Calibration times Generate; inpainting-only models and refiners learn their limits from live batches.
            return
        model = self._registry.get_loaded(entry)
        precision = self._settings.precision
        key = (entry.identity, entry.default_width, entry.default_height, precision)
        profile = self._profiles.profile_of(entry.identity, precision)
        size = 1
        best = float("inf")
        while size <= self._batching.max_images:
            per_step = _step_seconds(model, entry, size, steps, profile)
            self._batching.observe(key, size, per_step, "calibrated")
            per_image = per_step / size
            if size > 1 and per_image >= best * MARGIN:
                # Not faster per image than a smaller batch: larger ones won't be either, and on big latents
                # each further size costs seconds of start-up.
                break
            best = min(best, per_image)
            size *= 2
        log.info("batch sizes calibrated", extra={"model": entry.name, "limits": str(self._batching.limits())})


def _one_step(model: LoadedModel, entry: ModelEntry) -> None:
    """One denoising step at the model's default size (the first of Generate, Edit and Inpaint it runs)."""
    task = entry.tasks[0]
    scheduler = schedulers.build("", entry.scheduler_config)
    pipeline.warm_up(model.components, task, entry.default_width, entry.default_height, scheduler)


def _step_seconds(model: LoadedModel, entry: ModelEntry, size: int, steps: int, profile: Profile) -> float:
    """Seconds per denoising step of a batch of `size` images at the model's default size in `profile`."""
    scheduler = schedulers.build("", entry.scheduler_config)
    w, h = entry.default_width, entry.default_height
    return pipeline.step_seconds(model.components, size, steps, w, h, scheduler, profile)
