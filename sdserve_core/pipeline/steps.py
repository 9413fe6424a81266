"""The step callback: times the denoising steps and lets an observer act on each one, or stop the loop."""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class StopDenoising(Exception):
    """Raised from the step callback when the observer has nothing left to denoise for."""


class StepObserver(Protocol):
    """Who watches a pipeline call's steps (the server's batch: stops, progress events, previews)."""

    def go_on(self) -> bool:
        """Asked first at the end of every step: False stops the denoising loop (StopDenoising is raised)."""

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        """Step `step` of `total` (1-based) finished with `latents`; its seconds count as preview time."""


class StepCallback:
    """diffusers' `callback_on_step_end`. Marks the perf_counter time at the end of the first and the last step
    (after the observer), the seconds spent in the observer, and how many steps ended."""

    def __init__(self, observer: StepObserver | None = None) -> None:
        self.observer = observer
        self.first = 0.0
        self.last = 0.0
        self.preview = 0.0
        self.count = 0

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.observer is None:
            now = time.perf_counter()
        else:
            if not self.observer.go_on():
                raise StopDenoising
            step, total = i + 1, int(pipe.num_timesteps)
            latents = kwargs["latents"]
            start = time.perf_counter()
            self.observer.on_step(step, total, latents)
            now = time.perf_counter()
            self.preview += now - start
        self.first = self.first or now
        self.last = now
        self.count += 1
        return kwargs

    def seconds_per_step(self) -> float:
        """Seconds per step between the first and the last step's end (setup and decoding excluded)."""
        return (self.last - self.first) / (self.count - 1)
