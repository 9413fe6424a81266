"""Shared training-loop pieces: time-budgeted learning-rate schedule, EMA, seeding, progress lines."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """The UNet stages' compute precision: "fp32", or "bf16" (autocast; weights, optimiser state and the loss
    stay fp32). "auto" picks bf16 where the device computes it natively (a CUDA card that supports it, or a
    CPU with AVX512-BF16 or AMX, through oneDNN), since emulated bf16 is slower than fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    mkldnn = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    native = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "bf16" if native else "fp32"


def autocast(precision: str, device: str = "cpu") -> AbstractContextManager[object]:
    """The forward pass's autocast context for a resolved precision (a no-op for fp32)."""
    return torch.autocast(device.split(":", maxsplit=1)[0], dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class UNetStage:
    """What every UNet stage (2, 2b, inpaint) is given: the VAE and tokenizer folders, its training time (or a
    fixed step count instead), the run's seed, the compute precision (see resolve_precision) and the batch size."""

    vae_dir: Path
    tokenizer_dir: Path
    seconds: float
    seed: int
    steps: int | None = None
    precision: str = "fp32"
    batch: int = 32


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Budget:
    """Warm-up then cosine decay over elapsed time (or over a fixed step count when steps is set).

    Scheduling by time means a time-boxed run always ends fully decayed, however fast the machine is.
    """

    def __init__(self, seconds: float, warmup_steps: int, steps: int | None = None, floor: float = 0.02):
        self.seconds = seconds
        self.warmup_steps = warmup_steps
        self.steps = steps
        self.floor = floor
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        """Fraction of the budget used, in [0, 1]."""
        if self.steps is not None:
            return min(1.0, step / max(self.steps, 1))
        return min(1.0, self.elapsed() / max(self.seconds, 1e-9))

    def done(self, step: int) -> bool:
        """Whether training should stop before this step."""
        return self.progress(step) >= 1.0

    def factor(self, step: int) -> float:
        """Learning-rate multiplier for this step."""
        warm = min(1.0, (step + 1) / self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        return warm * (self.floor + (1 - self.floor) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the current parameters."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live parameters with the average."""
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def optimise(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], ema: EMA
) -> None:
    """One optimiser step: backward, clip the gradient norm to 1, step, then update the EMA weights."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    ema.update()


def recon_loss(
    rec: torch.Tensor, x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 + MSE reconstruction loss of a decoded batch, and its unweighted L1 part (both VAE stages). With
    per-pixel weights (broadcast over channels) the loss is their weighted mean."""
    d = rec - x
    l1 = d.abs().mean()
    if weights is None:
        return l1 + d.pow(2).mean(), l1
    w = weights.expand_as(d)
    return ((d.abs() + d.pow(2)) * w).sum() / w.sum(), l1


def plain_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """One optimiser step without clipping or EMA (the VAE stages)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def finish_unet(
    ema: EMA, budget: Budget, progress: Progress, step: int, loss: float, precision: str, batch: int
) -> dict[str, float | str]:
    """End a UNet stage: copy the EMA weights in and log and return the stage's figures."""
    ema.copy_to_params()
    figures = {"steps": step, "seconds": budget.elapsed(), "final_loss": loss}
    progress.step(step, force=True, **figures)
    return {**figures, "precision": precision, "batch": batch}


def smooth(previous: float, value: float, step: int) -> float:
    """Exponential moving average of the loss for progress lines (the first value as is)."""
    return value if step == 0 else 0.98 * previous + 0.02 * value


class Progress:
    """Logs one progress line every `every` seconds."""

    def __init__(self, stage: str, every: float = 30.0):
        self.stage = stage
        self.every = every
        self.last = -math.inf
        self.start = time.monotonic()

    def step(self, step: int, force: bool = False, **values: float) -> None:
        """Log the step's values if enough time has passed (or force)."""
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.last = now
            parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("stage=%s step=%d %s elapsed=%.0fs", self.stage, step, parts, now - self.start)
