"""Measuring execution profiles: each candidate's step time and its quality against the exact profile, as pipeline
calls like any other (sdserve_core.profiles says what the levers are and how the winner is chosen)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sdserve_core import profiles
from sdserve_core.components import Components
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import run, step_seconds
from sdserve_core.profiles import Profile, Trial
from sdserve_core.tasks import Task

logger = logging.getLogger(__name__)

# The guard's probe set: fixed prompts and seeds, rendered in one call (a prompt per image). Short, generic prompts
# that every family's tokenizer takes, including the shapes models' grammar (a colour and a shape).
PROBES: tuple[tuple[str, int], ...] = (
    ("a red circle on the left", 0),
    ("a blue square at the top", 1),
    ("a green triangle", 2),
)
# Steps of the timing run: the per-step time is measured between the first and the last step's end.
TIMING_STEPS = 3

SchedulerFactory = Callable[[], Any]


def probe_images(
    components: Components, profile: Profile, width: int, height: int, steps: int, scheduler: SchedulerFactory
) -> list[np.ndarray]:
    """The probe set rendered in `profile` at `width` x `height` with `steps` steps, as uint8 RGB arrays."""
    call = PipelineCall(
        task=Task.GENERATE,
        steps=steps,
        width=width,
        height=height,
        generators=tuple(torch.Generator("cpu").manual_seed(seed) for _, seed in PROBES),
        output_type="pil",
        prompt=tuple(text for text, _ in PROBES),
        profile=profile,
    )
    return [np.asarray(img.convert("RGB")) for img in run(components, call, scheduler())]


def timed(components: Components, profile: Profile, width: int, height: int, scheduler: SchedulerFactory) -> float:
    """Seconds per denoising step of one image in `profile`, after one warm-up step (which compiles, for a compiled
    profile: inductor's cache makes the next start's warm-up short)."""
    warm = PipelineCall(
        task=Task.GENERATE,
        steps=1,
        width=width,
        height=height,
        generators=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
        prompt="",
        profile=profile,
    )
    run(components, warm, scheduler())
    return step_seconds(components, 1, TIMING_STEPS, width, height, scheduler(), profile)


def trials(
    components: Components,
    candidates: Sequence[Profile],
    size: tuple[int, int],
    scheduler: SchedulerFactory,
    min_psnr: float,
    probe_steps: int,
    probe_all: bool = False,
) -> list[Trial]:
    """Measures EXACT and each candidate at `size`: the step time of every one, and the probe PSNR of those that
    measured faster than EXACT (a slower one cannot be chosen, so it costs no probe render unless `probe_all`: the
    bench reports every lever's quality). A candidate that fails to run is refused with its error; the model stays
    in EXACT afterwards (memory format restored)."""
    width, height = size
    exact_time = timed(components, profiles.EXACT, width, height, scheduler)
    out = [Trial(profiles.EXACT, exact_time, 0.0, True)]
    reference: list[np.ndarray] | None = None
    for profile in candidates:
        if profile.exact:
            continue
        try:
            seconds = timed(components, profile, width, height, scheduler)
            slower = seconds >= exact_time * profiles.MARGIN
            if slower and not probe_all:
                out.append(Trial(profile, seconds, 0.0, False, "not faster than exact"))
                continue
            if reference is None:
                reference = probe_images(components, profiles.EXACT, width, height, probe_steps, scheduler)
            got = probe_images(components, profile, width, height, probe_steps, scheduler)
            worst = min(profiles.psnr(a, b) for a, b in zip(reference, got, strict=True))
        except Exception as exc:  # a lever this device or model cannot take: refused, never fatal
            logger.warning("profile %s failed: %s", profile.name, exc)
            out.append(Trial(profile, math.inf, 0.0, False, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        ok = worst >= min_psnr
        reason = "" if ok else f"probe PSNR {worst:.1f} dB is under {min_psnr:g} dB"
        if slower:
            reason = "; ".join(filter(None, ("not faster than exact", reason)))
        out.append(Trial(profile, seconds, worst, ok, reason))
    profiles.reset(components.unet)
    return out


def choose(
    components: Components,
    candidates: Sequence[Profile],
    size: tuple[int, int],
    scheduler: SchedulerFactory,
    min_psnr: float,
    probe_steps: int,
) -> tuple[Profile, list[Trial], float]:
    """The profile to serve in (profiles.choose over `trials`), the trials, and the seconds choosing took."""
    start = time.perf_counter()
    measured = trials(components, candidates, size, scheduler, min_psnr, probe_steps)
    chosen = profiles.choose(measured)
    return chosen, measured, time.perf_counter() - start
