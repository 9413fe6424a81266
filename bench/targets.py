"""The issue's performance targets, checked against one model's results."""

from __future__ import annotations

import dataclasses
from typing import Any

# Concurrency-1 latency ratio (sdserve p50 / direct p50) allowed per model key.
LATENCY_LIMIT = {"tiny": 1.15, "small": 1.05, "sdxl": 1.05}
# Images/s at concurrency 8 over direct sequential, on the tiny model; everywhere else at least 1.0.
TINY_C8_SPEEDUP = 1.5
PREVIEW_LIMIT = 0.03
CANCEL_SLACK_S = 0.050


@dataclasses.dataclass(frozen=True)
class Check:
    """One target: what was measured, the limit, and whether it was met."""

    model: str
    target: str
    value: str
    limit: str
    met: bool


def check(result: dict[str, Any]) -> list[Check]:
    """Every target that applies to this model's result."""
    key = result["key"]
    direct = result["direct"]["phase"]
    off, on = result["sdserve_off"], result["sdserve_on"]
    out: list[Check] = []
    limit = LATENCY_LIMIT.get(key)
    if limit is not None:
        for label, phase in (("batching off", off["c1"]), ("batching on", on["c1"])):
            ratio = phase.latency_p50 / direct.latency_p50
            out.append(Check(key, f"latency ratio p50 at c=1, {label}", f"{ratio:.3f}", f"<= {limit}", ratio <= limit))
    # Throughput targets apply where requests overlap; at c=1 images/s is 1 / latency, covered above.
    for conc in sorted(result["plan"]["throughput_requests"]):
        need = TINY_C8_SPEEDUP if key == "tiny" and conc == 8 else 1.0
        ratio = on[f"c{conc}"].images_per_s / direct.images_per_s
        out.append(
            Check(key, f"images/s at c={conc} / direct sequential", f"{ratio:.2f}x", f">= {need}x", ratio >= need)
        )
    none = off["previews"]["none"].latency_p50
    cost = off["previews"]["latent_rgb_every_1"].latency_p50 / none - 1.0
    out.append(
        Check(
            key, "LATENT_RGB every step, latency cost", f"{cost:+.1%}", f"<= {PREVIEW_LIMIT:.0%}", cost <= PREVIEW_LIMIT
        )
    )
    for label, trials in (("batching off", off["cancels"]), ("batching on", on["cancels"])):
        worst = max(trials, key=lambda t: t["cancel_latency"] - t["step"])
        margin = worst["cancel_latency"] - worst["step"]
        out.append(
            Check(
                key,
                f"cancel latency (worst trial), {label}",
                f"{worst['cancel_latency'] * 1000:.0f} ms (step {worst['step'] * 1000:.0f} ms)",
                "<= step + 50 ms",
                margin <= CANCEL_SLACK_S,
            )
        )
    return out
