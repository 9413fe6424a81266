"""What each model is benchmarked with: size, steps, request counts, and the prompt and seed of request i."""

from __future__ import annotations

import dataclasses
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large", "medium")
PLACES = ("in the centre", "on the left", "on the right", "at the top", "at the bottom")
BACKGROUNDS = ("white", "blue", "grey", "black", "green", "yellow")

# Each phase draws from its own range of request indices, so no prompt repeats across phases and the
# server's prompt-embedding cache only ever sees the (empty) negative prompt twice: a worst case for it.
PHASE_BASE = {"c1": 0, "c4": 1000, "c8": 2000, "preview": 3000, "cancel": 4000, "c1-batch": 5000, "warmup": 9000}


def prompt(i: int) -> str:
    """Request i's prompt: distinct for i below 2880, in the embedded shapes model's vocabulary."""
    n = i % (len(COLOURS) * len(SHAPES) * len(SIZES) * len(PLACES) * len(BACKGROUNDS))
    parts = []
    for table in (COLOURS, SHAPES, SIZES, PLACES, BACKGROUNDS):
        parts.append(table[n % len(table)])
        n //= len(table)
    colour, shape, size, place, bg = parts
    return f"a {size} {colour} {shape} {place} on a {bg} background"


def seed(i: int) -> int:
    """Request i's seed."""
    return 1000 + i


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model's benchmark plan; the same parameters go to diffusers and to sdserve."""

    key: str
    model: str
    model_dir: Path
    width: int
    height: int
    steps: int
    guidance: float
    latency_requests: int
    throughput_requests: dict[int, int]
    preview_rounds: int
    cancel_trials: int
    cancel_after_step: int
    warmup_steps: int = 2

    def indices(self, phase: str, count: int) -> list[int]:
        base = PHASE_BASE[phase]
        return list(range(base, base + count))


def plan(key: str, model: str, model_dir: Path, quick: bool) -> Workload:
    """The request counts for a model key; `quick` shrinks everything to a smoke test."""
    if key == "tiny":
        if quick:
            return Workload(key, model, model_dir, 64, 64, 20, 7.5, 4, {4: 8, 8: 8}, 1, 1, 3)
        return Workload(key, model, model_dir, 64, 64, 20, 7.5, 24, {4: 48, 8: 64}, 10, 5, 3)
    if key == "small":
        if quick:
            return Workload(key, model, model_dir, 128, 128, 4, 7.5, 2, {4: 4, 8: 8}, 1, 1, 2)
        return Workload(key, model, model_dir, 256, 256, 12, 7.5, 4, {4: 8, 8: 8}, 2, 3, 3)
    if key == "sd15":
        if quick:
            return Workload(key, model, model_dir, 256, 256, 2, 7.5, 1, {4: 4, 8: 8}, 1, 1, 1)
        return Workload(key, model, model_dir, 512, 512, 20, 7.5, 2, {4: 4, 8: 8}, 1, 1, 2)
    if key == "sdxl":
        if quick:
            return Workload(key, model, model_dir, 256, 256, 3, 5.0, 1, {4: 4}, 1, 1, 1)
        return Workload(key, model, model_dir, 512, 512, 10, 5.0, 4, {4: 8}, 2, 3, 3)
    raise ValueError(f"unknown model key {key!r}")
