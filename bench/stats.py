"""Percentiles and per-phase summaries of request records."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request as the caller saw it; times in seconds from the moment it was submitted."""

    index: int
    latency: float
    first_progress: float
    started: float
    batch_size: int
    step_times: tuple[float, ...]
    # Where the server says the time went (sdserve only): queue, prepare, denoise, decode, encode, total, preview.
    server: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Phase:
    """A set of requests run at one concurrency, summarised."""

    name: str
    concurrency: int
    requests: int
    images: int
    wall: float
    images_per_s: float
    latency_p50: float
    latency_p95: float
    latency_mean: float
    first_progress_p50: float
    step_p50: float
    mean_batch: float
    server_mean: dict[str, float]
    records: tuple[RequestRecord, ...]


def summarise(name: str, concurrency: int, records: Sequence[RequestRecord], wall: float) -> Phase:
    """Latency percentiles, images per second over `wall`, and the server's mean timings."""
    lat = [r.latency for r in records]
    keys = sorted({k for r in records for k in r.server})
    server_mean = {k: mean([r.server[k] for r in records if k in r.server]) for k in keys}
    steps = [s for r in records for s in r.step_times]
    return Phase(
        name=name,
        concurrency=concurrency,
        requests=len(records),
        images=len(records),
        wall=wall,
        images_per_s=len(records) / wall if wall > 0 else float("nan"),
        latency_p50=percentile(lat, 50),
        latency_p95=percentile(lat, 95),
        latency_mean=mean(lat),
        first_progress_p50=percentile([r.first_progress for r in records], 50),
        step_p50=median(steps),
        mean_batch=mean([float(r.batch_size) for r in records]),
        server_mean=server_mean,
        records=tuple(records),
    )
