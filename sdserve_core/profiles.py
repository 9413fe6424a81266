"""Execution profiles: how a model's pipeline calls run on the device, beyond its weights.

A profile combines three levers, each of which keeps the weights as loaded:

- `autocast`: compute the UNet, VAE and text encoders under torch.autocast in bfloat16 or float16 (weights stay in
  their dtype; matmuls and convolutions run in the lower precision where the device has instructions for it);
- `channels_last`: the UNet's convolutions in NHWC memory format (the weights are converted in place; a call in a
  profile without it converts them back first, so an `exact` call always runs the default format);
- `compile`: the UNet through torch.compile (inductor), built once per loaded model and warmed before it serves.

`EXACT` (none of them) is the pipeline diffusers runs when called directly with the same weights: the same pixels,
bit for bit, on the same machine. A profile's name joins its levers with "+" ("bf16-autocast+channels-last"), and
`parse` reads it back. Which profile a model serves with is chosen by measurement with a quality guard
(`psnr`, `trial`); see docs/performance.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

AUTOCAST = {"bf16-autocast": "bfloat16", "fp16-autocast": "float16"}
CHANNELS_LAST = "channels-last"
COMPILE = "compile"
CUDA_GRAPHS = "cuda-graphs"
ONNXRUNTIME = "onnxruntime"
EXACT_NAME = "exact"
LEVERS = (*AUTOCAST, CHANNELS_LAST, COMPILE, CUDA_GRAPHS, ONNXRUNTIME)


@dataclasses.dataclass(frozen=True)
class Profile:
    """One execution profile. `autocast` is "" (none), "bfloat16" or "float16"."""

    autocast: str = ""
    channels_last: bool = False
    compile: bool = False
    # With compile: inductor's "reduce-overhead" mode, which replays the UNet as CUDA graphs (GPUs only).
    cuda_graphs: bool = False
    # The UNet exported to ONNX and run by ONNX Runtime's CPU provider (sdserve_core.onnx_unet); alone.
    onnxruntime: bool = False

    def __post_init__(self) -> None:
        if self.autocast not in ("", *AUTOCAST.values()):
            raise ValueError(f"autocast must be bfloat16, float16 or empty, not {self.autocast!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda-graphs is a mode of compile: name both (compile+cuda-graphs)")
        if self.onnxruntime and (self.autocast or self.channels_last or self.compile):
            raise ValueError("onnxruntime replaces the torch UNet: it takes no other lever")

    @property
    def exact(self) -> bool:
        return not (self.autocast or self.channels_last or self.compile or self.onnxruntime)

    @property
    def name(self) -> str:
        parts = [lever for lever, dtype in AUTOCAST.items() if dtype == self.autocast]
        parts += [CHANNELS_LAST] * self.channels_last + [COMPILE] * self.compile + [CUDA_GRAPHS] * self.cuda_graphs
        parts += [ONNXRUNTIME] * self.onnxruntime
        return "+".join(parts) or EXACT_NAME

    def without_compile(self) -> Profile:
        """The profile for a batch with LoRAs active: no compiled or exported UNet (peft switches adapters per call,
        and an export holds the weights it was made from)."""
        return dataclasses.replace(self, compile=False, cuda_graphs=False, onnxruntime=False)


EXACT = Profile()


def parse(text: str) -> Profile:
    """The profile named `text` ("exact", or levers joined by "+": bf16-autocast, fp16-autocast, channels-last,
    compile, cuda-graphs (with compile)); ValueError naming the part and the rule."""
    text = text.strip()
    if text == EXACT_NAME:
        return EXACT
    parts = [p.strip() for p in text.split("+")]
    unknown = [p for p in parts if p not in LEVERS]
    if not text or unknown:
        bad = unknown[0] if unknown else text
        raise ValueError(f"unknown profile lever {bad!r}: use exact or {', '.join(LEVERS)} joined by '+'")
    if len(set(parts)) != len(parts):
        raise ValueError(f"profile {text!r} names a lever twice")
    autocasts = [AUTOCAST[p] for p in parts if p in AUTOCAST]
    if len(autocasts) > 1:
        raise ValueError(f"profile {text!r} names two autocast precisions; pick one")
    if CUDA_GRAPHS in parts and COMPILE not in parts:
        raise ValueError(f"profile {text!r}: cuda-graphs is a mode of compile; name both (compile+cuda-graphs)")
    if ONNXRUNTIME in parts and len(parts) > 1:
        raise ValueError(f"profile {text!r}: onnxruntime replaces the torch UNet and takes no other lever")
    return Profile(
        autocast=autocasts[0] if autocasts else "",
        channels_last=CHANNELS_LAST in parts,
        compile=COMPILE in parts,
        cuda_graphs=CUDA_GRAPHS in parts,
        onnxruntime=ONNXRUNTIME in parts,
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): without it, bf16 matmuls are emulated
    and measured many times slower than fp32 (docs/performance.md)."""
    cpu: Any = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def candidates(device_type: str, weights_dtype: torch.dtype, with_compile: bool) -> list[Profile]:
    """The profiles worth measuring on a device by default, EXACT first. CUDA: channels_last, autocast over float32
    weights (float16, and bfloat16 where supported), each again compiled when `with_compile`, and the
    default-layout ones compiled with CUDA graphs too. CPU (float32 weights): onnxruntime where it is installed,
    and bfloat16 autocast (with and without channels_last) only where the CPU computes bfloat16 natively
    (AVX512-BF16 or AMX): on the reference CPU channels_last measured 2% slower, bf16 17x slower and compile no
    faster (bench/README.md), while ONNX Runtime ran the UNet 1.2-2.7x faster. Other devices: none."""
    out = [EXACT]
    if device_type == "cuda":
        precisions = [""]
        if weights_dtype == torch.float32:
            precisions.append("float16")
            if torch.cuda.is_bf16_supported():
                precisions.append("bfloat16")
        out = [Profile(autocast=p, channels_last=cl) for p in precisions for cl in (False, True)]
    elif device_type == "cpu" and weights_dtype == torch.float32:
        from sdserve_core import onnx_unet

        if onnx_unet.available():
            out.append(Profile(onnxruntime=True))
        if cpu_has_native_bf16():
            out += [Profile(autocast="bfloat16"), Profile(autocast="bfloat16", channels_last=True)]
    if with_compile:
        compiled = [dataclasses.replace(p, compile=True) for p in out if not p.onnxruntime]
        graphs = [dataclasses.replace(p, cuda_graphs=True) for p in compiled if not p.channels_last]
        out += compiled + (graphs if device_type == "cuda" else [])
    return out


_compile_lock = threading.Lock()
# The attribute of a UNet module holding its compiled wrappers by inductor mode. Set with object.__setattr__ (not
# as a submodule): the wrapper refers back to the UNet, a cycle the garbage collector frees with the model.
_COMPILED_ATTR = "_sdserve_compiled"


def compiled_unet(unet: Any, cuda_graphs: bool = False) -> Any:
    """`unet` through torch.compile (inductor; "reduce-overhead", which replays CUDA graphs, with `cuda_graphs`),
    built once per module and mode; the first call with each input shape compiles (or loads from the inductor
    cache, see `use_compile_cache`)."""
    mode = "reduce-overhead" if cuda_graphs else "default"
    with _compile_lock:
        wrappers: dict[str, Any] = unet.__dict__.setdefault(_COMPILED_ATTR, {})
        found = wrappers.get(mode)
        if found is None:
            found = torch.compile(unet, mode=mode)
            wrappers[mode] = found
        return found


def drop_compiled(unet: Any) -> None:
    """Forgets `unet`'s compiled wrappers (so its memory is freed with it, without waiting for a GC cycle)."""
    with _compile_lock:
        unet.__dict__.pop(_COMPILED_ATTR, None)


def use_compile_cache(folder: Path) -> None:
    """Points inductor's on-disk caches (generated kernels, FX graphs) at `folder`, so a restart loads compiled
    kernels instead of compiling again. Call before the first compile."""
    import torch._inductor.config as inductor_config

    folder.mkdir(parents=True, exist_ok=True)
    # Inductor reads its cache folder from this variable each time it resolves the cache path.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    inductor_config.fx_graph_cache = True


def _set_channels_last(module: Any, on: bool) -> None:
    """Converts `module`'s 4-d weights to channels_last (or back to contiguous) when they are not already."""
    want = torch.channels_last if on else torch.contiguous_format
    for p in module.parameters():
        if p.dim() == 4:
            if p.is_contiguous(memory_format=want):
                continue
            module.to(memory_format=want)
            return


def reset(unet: Any) -> None:
    """Puts `unet` back in the default memory format (after trying channels_last)."""
    _set_channels_last(unet, False)


@contextlib.contextmanager
def applied(profile: Profile | None, unet: Any, device_type: str) -> Iterator[None]:
    """Runs the body in `profile` (None: EXACT): the UNet's memory format as the profile says (converted in place
    when it differs; it stays so for the next call in the same profile) and, for autocast, torch.autocast on the
    device. Calls on one model must not overlap (the server runs them one at a time on its worker thread)."""
    profile = profile or EXACT
    _set_channels_last(unet, profile.channels_last)
    if not profile.autocast:
        yield
        return
    dtype = getattr(torch, profile.autocast)
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images of the same shape (inf when identical)."""
    diff = reference.astype(np.float64) - other.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 * 255.0 / mse)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate profile measured for a model at a size: seconds per denoising step (batch of one image) and
    the worst PSNR of its probe images against EXACT's. `accepted` says whether it passed the guard; `reason`
    says why not."""

    profile: Profile
    seconds_per_step: float
    psnr_db: float
    accepted: bool
    reason: str = ""


# A profile must beat EXACT's step time by this factor to be chosen: noise is not a reason to leave exact.
MARGIN = 0.97


def choose(trials: list[Trial]) -> Profile:
    """The fastest accepted trial's profile, if it beats EXACT's measured step time by MARGIN; else EXACT."""
    exact = next((t for t in trials if t.profile.exact), None)
    accepted = [t for t in trials if t.accepted and not t.profile.exact]
    if exact is None or not accepted:
        return EXACT
    best = min(accepted, key=lambda t: t.seconds_per_step)
    return best.profile if best.seconds_per_step < exact.seconds_per_step * MARGIN else EXACT
