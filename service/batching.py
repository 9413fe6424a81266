"""Chooses how many images one pipeline call may carry, per model revision and resolution, from measured
per-image step times: calibrated at warm-up for the default size, then learned from live batches."""

from __future__ import annotations

import dataclasses
import threading

from service.jobs import Job
from service.requests import ServedIdentity

Key = tuple[ServedIdentity, int, int, str]  # served identity, width, height, precision (fast or exact)
# A batch size must beat the best smaller one by this factor to be preferred: noise is not a reason to batch.
MARGIN = 0.97
# Weight of a new measurement in the running average of a batch size's per-image step time.
ALPHA = 0.3


@dataclasses.dataclass
class _Stats:
    per_image_step: dict[int, float] = dataclasses.field(default_factory=dict)
    limit: int = 1
    source: str = "learning"


@dataclasses.dataclass(frozen=True)
class Limit:
    """The chosen limit for one model and resolution, and where it came from."""

    model: str
    variant: str
    width: int
    height: int
    max_images: int
    source: str
    precision: str = "fast"


class BatchPolicy:
    """Per-key batch limits. Unmeasured keys (a size calibration did not cover) start at 1 and explore upward
    (2, 4, ...) only while the larger batch measures faster per image than every smaller one; a size that measured
    slower is not tried again, so batching never settles on (or keeps exploring) a size that lowers throughput."""

    def __init__(self, max_images: int):
        self.max_images = max(1, max_images)
        self._stats: dict[Key, _Stats] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key_of(job: Job) -> Key:
        r = job.resolved
        return (r.identity, r.width, r.height, r.precision)

    def limit(self, job: Job) -> int:
        return self.limit_for(self.key_of(job))

    def limit_for(self, key: Key) -> int:
        """How many images the next pipeline call for `key` may carry."""
        if self.max_images == 1:
            return 1
        with self._lock:
            stats = self._stats.get(key)
            # A size never measured runs alone first: batching is tried only against a measured single image.
            return 1 if stats is None else stats.limit

    def observe(self, key: Key, images: int, step_seconds: float, source: str = "learned") -> None:
        """Records one pipeline call: `images` images took `step_seconds` per denoising step."""
        if images < 1 or step_seconds <= 0:
            return
        per_image = step_seconds / images
        with self._lock:
            stats = self._stats.setdefault(key, _Stats())
            old = stats.per_image_step.get(images)
            stats.per_image_step[images] = per_image if old is None else (1 - ALPHA) * old + ALPHA * per_image
            stats.limit = self._choose(stats.per_image_step)
            if source == "calibrated" or stats.source != "calibrated":
                stats.source = source

    def _choose(self, measured: dict[int, float]) -> int:
        if 1 not in measured:
            # Only batches measured so far (another limit's live batches): measure one image alone before
            # exploring further, so no size is tried without a baseline to beat.
            return 1
        best = 1
        for size in sorted(measured):
            if size != best and measured[size] < measured[best] * MARGIN:
                best = size
        largest = max(measured)
        if best == largest and largest < self.max_images:
            # The largest size measured so far is the fastest: let the next batch try twice as many.
            return min(largest * 2, self.max_images)
        return best

    def limits(self) -> list[Limit]:
        with self._lock:
            return [
                Limit(
                    model=k[0].model,
                    variant=k[0].variant,
                    width=k[1],
                    height=k[2],
                    max_images=s.limit,
                    source=s.source,
                    precision=k[3],
                )
                for k, s in sorted(self._stats.items(), key=lambda item: (item[0][0].slot, *item[0][1:]))
            ]
