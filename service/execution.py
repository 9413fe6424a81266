"""Which execution profile each loaded model serves `fast` requests in: chosen once per served identity when the
model loads (on the device worker), by measuring the candidates against the exact profile with the quality guard
(sdserve_core.pipeline.trial), or fixed by the `execution_profile` setting. `exact` requests always run EXACT."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from sdserve_core import profiles
from sdserve_core.pipeline import trial
from sdserve_core.profiles import Profile, Trial
from service import schedulers
from service.models import LoadedModel
from service.requests import ResolvedRequest, ServedIdentity, Task
from service.settings import Settings

log = logging.getLogger(__name__)

EXACT = "exact"
FAST = "fast"
# Steps of the guard's probe renders: enough for the trajectories of two profiles to part where they would.
PROBE_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Choice:
    """The profile a model serves `fast` requests in, where it came from ("measured" or "configured"), the trials
    behind it, and the seconds choosing took."""

    identity: ServedIdentity
    width: int
    height: int
    profile: Profile
    source: str
    trials: tuple[Trial, ...] = ()
    seconds: float = 0.0


def compile_cache(settings: Settings) -> Path:
    """The compile cache folder (`compile_cache_dir`, default ~/.cache/sdserve/compile)."""
    if settings.compile_cache_dir:
        return Path(settings.compile_cache_dir)
    return Path.home() / ".cache" / "sdserve" / "compile"


def _trial_line(t: Trial) -> str:
    return f"{t.profile.name}: {t.seconds_per_step:.4f} s/step {t.reason}".strip()


class ProfileBook:
    """The execution profile of every loaded model (thread-safe: the worker writes, RPCs read)."""

    def __init__(self, settings: Settings, device_type: str):
        self._settings = settings
        self._device_type = device_type
        self._fixed = None if settings.execution_profile == "auto" else profiles.parse(settings.execution_profile)
        names = [n.strip() for n in settings.profile_candidates.split(",") if n.strip()]
        self._configured = [profiles.parse(n) for n in names]
        self._choices: dict[ServedIdentity, Choice] = {}
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return self._settings.execution_profile

    def profile_for(self, resolved: ResolvedRequest, adapters: bool = False) -> Profile:
        """The profile `resolved` runs in: EXACT for exact requests; otherwise its model's (EXACT until chosen).
        A batch with LoRAs active runs its profile uncompiled (peft's per-call adapter switches would recompile)."""
        profile = self.profile_of(resolved.identity, resolved.precision)
        return profile.without_compile() if adapters else profile

    def profile_of(self, identity: ServedIdentity, precision: str) -> Profile:
        """The profile requests of `precision` run in on the model `identity` (EXACT until it is chosen)."""
        if precision == EXACT:
            return profiles.EXACT
        with self._lock:
            choice = self._choices.get(identity)
        return profiles.EXACT if choice is None else choice.profile

    def ensure(self, model: LoadedModel) -> Choice:
        """The model's choice, made now when it has none (on the device worker: it runs pipeline calls)."""
        identity = model.entry.identity
        with self._lock:
            found = self._choices.get(identity)
        if found is not None:
            return found
        try:
            choice = self._choose(model)
        except Exception as exc:  # choosing must never fail a request: the model serves exact
            log.exception("execution profile trials failed; serving exact", extra={"model": model.name})
            size = (model.entry.default_width, model.entry.default_height)
            choice = Choice(identity, *size, profiles.EXACT, f"failed: {type(exc).__name__}")
        with self._lock:
            self._choices[identity] = choice
        log.info(
            "execution profile chosen",
            extra={
                "model": model.name,
                "profile": choice.profile.name,
                "source": choice.source,
                "seconds": round(choice.seconds, 3),
                "trials": [
                    f"{t.profile.name}: {t.seconds_per_step:.4f} s/step {t.reason}".strip() for t in choice.trials
                ],
            },
        )
        return choice

    def _choose(self, model: LoadedModel) -> Choice:
        entry = model.entry
        identity, size = entry.identity, (entry.default_width, entry.default_height)
        if self._fixed is not None:
            return Choice(identity, *size, self._fixed, "configured")
        if model.offloaded:
            # Offload's hooks move modules per call; the levers are measured only on models resident on the device.
            return Choice(identity, *size, profiles.EXACT, "configured")
        if Task.GENERATE not in entry.tasks:
            # The trials time and probe Generate; an inpainting-only model (9-channel UNet) serves exact under auto.
            return Choice(identity, *size, profiles.EXACT, "no-candidates")
        candidates = self._configured or profiles.candidates(
            self._device_type, model.choice.dtype, with_compile=self._device_type == "cuda"
        )
        if all(p.exact for p in candidates):
            return Choice(identity, *size, profiles.EXACT, "no-candidates")
        if any(p.compile for p in candidates):
            profiles.use_compile_cache(compile_cache(self._settings))
        if any(p.onnxruntime for p in candidates):
            from sdserve_core import onnx_unet

            onnx_unet.use_cache(compile_cache(self._settings) / "onnx")
        chosen, trials, seconds = trial.choose(
            model.components,
            candidates,
            size,
            lambda: schedulers.build("", entry.scheduler_config),
            self._settings.profile_min_psnr,
            PROBE_STEPS,
        )
        return Choice(identity, *size, chosen, "measured", tuple(trials), seconds)

    def forget(self, identity: ServedIdentity) -> None:
        """Drops an unloaded model's choice (a reload measures again)."""
        with self._lock:
            self._choices.pop(identity, None)

    def choices(self) -> list[Choice]:
        with self._lock:
            return sorted(self._choices.values(), key=lambda c: c.identity.slot)
