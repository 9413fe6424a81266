"""Memory strategies for big images: which of VAE tiling, VAE slicing, attention slicing and model CPU offload one
pipeline call uses (`plan`, `offload`), and turning them on for that call only (`applied`).

The rules and the measurements behind the numbers here are in docs/memory.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args

import torch

logger = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
MODES: tuple[str, ...] = get_args(Mode)

# 1536 x 1536 (2.36 megapixels) is past every SDXL training bucket (all near 1024 x 1024), so native sizes never pay
# tiling's time (1.7x the decode time at 2048 x 2048 with 1024-pixel tiles, measured) or its seams; from there up,
# decode_bytes puts a whole-image float32 decode with SDXL's VAE at 14 GB and more (6.4 GB at 1024 x 1024), more
# than a device that also holds the weights can be expected to have (docs/memory.md).
DEFAULT_TILING_MIN_PIXELS = 1536 * 1536
# decode_bytes: elements per output pixel that the decoder holds at once at its full-resolution level, in units of
# the channels of the level below it (upsampled, normalized, activated: three live copies) and of the top level's
# own channels (two), and the margin on top. Calibrated against peak RSS of AutoencoderKL.decode on CPU, float32:
# nine tiny configurations from 1024 x 1024 to 2048 x 2048 and batches of 2 measured 0.9x to 1.24x of the
# unmargined estimate, so with the margin the estimate is 1.2x to 1.7x of the measured peak (docs/memory.md).
DECODE_COPIES_BELOW = 3
DECODE_COPIES_TOP = 2
DECODE_MARGIN = 1.5
# offload: the device must hold the weights and their activations; at SDXL's native size the UNet's activations
# and the (tiled when short) decode stay under half the weights.
OFFLOAD_HEADROOM = 1.5
# On the CPU (whose free memory is not consulted), a batch decodes one image at a time once its whole decode
# (decode_bytes) would exceed this: on the reference 2-core CPU, sd15-small's batch of 8 at 256 x 256 decoded no
# slower sliced (189 s against 199 s, measured back to back) with 963 MiB peak RSS instead of 2294 MiB, so
# batching stops doubling the server's memory (docs/memory.md).
CPU_SLICE_MIN_BYTES = 512 * 1024 * 1024
TILING = "use_tiling"
SLICING = "use_slicing"


@dataclasses.dataclass(frozen=True)
class MemoryPolicy:
    """The server's memory settings. "on" and "off" force a strategy; "auto" lets `plan` / `offload` decide from
    the image size, the batch and the device's free memory."""

    vae_tiling: Mode = "auto"
    vae_tiling_min_pixels: int = DEFAULT_TILING_MIN_PIXELS
    vae_slicing: Mode = "auto"
    attention_slicing: Mode = "auto"
    cpu_offload: Mode = "auto"

    def __post_init__(self) -> None:
        for name in ("vae_tiling", "vae_slicing", "attention_slicing", "cpu_offload"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"{name} must be one of {', '.join(MODES)}, not {getattr(self, name)!r}")
        if self.vae_tiling_min_pixels < 1:
            raise ValueError(f"vae_tiling_min_pixels must be at least 1, not {self.vae_tiling_min_pixels}")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The strategies one pipeline call runs with."""

    vae_tiling: bool = False
    vae_slicing: bool = False
    attention_slicing: bool = False

    def label(self) -> str:
        """The names of the strategies that are on, sorted and comma-joined ("attention_slicing,vae_tiling"), or
        "none"."""
        on = sorted(field.name for field in dataclasses.fields(self) if getattr(self, field.name))
        return ",".join(on) or "none"


def _decide(mode: Mode, auto: bool) -> bool:
    return mode == "on" or (mode == "auto" and auto)


def decode_dtype(vae: Any) -> torch.dtype:
    """The dtype the VAE decodes in: float32 for a float16 VAE whose config says force_upcast (SDXL's), as diffusers'
    pipelines do; else its own."""
    dtype: torch.dtype = vae.dtype
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def decode_bytes(vae: Any, width: int, height: int, images: int, dtype: torch.dtype) -> int:
    """An estimate, with a margin, of the activation memory a whole-image (untiled, unsliced) decode of `images`
    images of `width` x `height` pixels takes in `dtype`: the decoder's full-resolution level holds about three
    copies of the level below's channels (block_out_channels[1], upsampled) and two of its own
    (block_out_channels[0]) per pixel. The mid-block attention at latent resolution is not counted: with
    scaled_dot_product_attention its memory is linear in the tokens and small beside the full-resolution level."""
    channels = tuple(int(c) for c in vae.config.block_out_channels)
    top = channels[0]
    below = channels[1] if len(channels) > 1 else top
    per_pixel = DECODE_COPIES_BELOW * below + DECODE_COPIES_TOP * top
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(images * width * height * per_pixel * itemsize * DECODE_MARGIN)


def sdpa_available() -> bool:
    """Whether torch has scaled_dot_product_attention (memory-efficient attention kernels, torch >= 2.0)."""
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


def plan(
    policy: MemoryPolicy, *, device_type: str, free_bytes: int | None, width: int, height: int, images: int, vae: Any
) -> MemoryPlan:
    """The strategies for one call of `images` images of `width` x `height` on a device of `device_type` with
    `free_bytes` free (None: unknown; on "cpu" it is not consulted, as host memory is not what the rule is about).
    Auto rules:

    - VAE tiling: at `vae_tiling_min_pixels` pixels or more, or when one image's whole decode (decode_bytes) does
      not fit in the free memory;
    - VAE slicing (one image at a time): for a batch (images > 1) when tiling is on or the batch's whole decode does
      not fit, and on the CPU when the batch's whole decode would take more than CPU_SLICE_MIN_BYTES;
    - attention slicing: only when torch lacks scaled_dot_product_attention.

    A strategy the VAE does not implement (no use_tiling / use_slicing attribute) stays off, even when forced."""
    known = free_bytes is not None and device_type != "cpu"
    dtype = decode_dtype(vae)
    one_short = known and free_bytes is not None and free_bytes < decode_bytes(vae, width, height, 1, dtype)
    batch_short = known and free_bytes is not None and free_bytes < decode_bytes(vae, width, height, images, dtype)
    tiling = _decide(policy.vae_tiling, width * height >= policy.vae_tiling_min_pixels or one_short)
    tiling = tiling and hasattr(vae, TILING)
    cpu_big = device_type == "cpu" and decode_bytes(vae, width, height, images, dtype) > CPU_SLICE_MIN_BYTES
    slicing = _decide(policy.vae_slicing, images > 1 and (tiling or batch_short or cpu_big)) and hasattr(vae, SLICING)
    attention = _decide(policy.attention_slicing, not sdpa_available())
    chosen = MemoryPlan(vae_tiling=tiling, vae_slicing=slicing, attention_slicing=attention)
    logger.debug(
        "memory plan %s for %d x %d x %d on %s (free %s bytes)",
        chosen.label(),
        width,
        height,
        images,
        device_type,
        free_bytes,
    )
    return chosen


def offload(policy: MemoryPolicy, *, device_type: str, free_bytes: int | None, model_bytes: int) -> bool:
    """Whether to load a model with model CPU offload (each component moved to the device only while it runs):
    with "auto", when the device's free memory before the load (`free_bytes`, None: unknown) is under
    OFFLOAD_HEADROOM times the model's weights (`model_bytes`, see weights_bytes); "on" forces it and "off" rules
    it out. On a "cpu" device it is always False, whatever the policy: the weights already live in host memory and
    there is nothing to offload them from."""
    if device_type == "cpu":
        return False
    if policy.cpu_offload != "auto":
        return policy.cpu_offload == "on"
    return free_bytes is not None and free_bytes < model_bytes * OFFLOAD_HEADROOM


def weights_bytes(modules: Iterable[Any]) -> int:
    """The bytes of the parameters and buffers of torch `modules` (for `offload`'s model_bytes)."""
    total = 0
    for module in modules:
        tensors = [*module.parameters(), *module.buffers()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def free_device_bytes(device: torch.device | str) -> int | None:
    """The memory free for torch on `device`: on CUDA and XPU, the driver's free memory plus what torch's caching
    allocator holds unused (free to torch, not to the driver); on MPS, the recommended working set less what the
    driver has allocated; None on the CPU and wherever it cannot be told."""
    dev = torch.device(device)
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None)}.get(dev.type)
    if backend is not None and hasattr(backend, "mem_get_info"):
        free, _total = backend.mem_get_info(dev)
        cached = int(backend.memory_reserved(dev)) - int(backend.memory_allocated(dev))
        return int(free) + max(cached, 0)
    mps: Any = getattr(torch, "mps", None)
    if dev.type == "mps" and mps is not None and hasattr(mps, "recommended_max_memory"):
        return max(int(mps.recommended_max_memory()) - int(mps.driver_allocated_memory()), 0)
    return None


@contextlib.contextmanager
def applied(vae: Any, unet: Any, plan: MemoryPlan) -> Iterator[None]:
    """Sets the VAE's tiling and slicing to what `plan` says and, when the plan slices attention, the UNet's
    attention processors to diffusers' sliced ones ("auto": half the heads at a time), for the body of the `with`;
    then puts back the state found on entry, also when the body raises. The components are shared by every pipeline
    object of a model, so this must wrap the pipeline call itself; calls on one model must not overlap (the server
    runs them one at a time on its worker thread). A plan without attention slicing leaves the processors as they
    are (they may be another feature's, such as adapters')."""
    saved = {name: getattr(vae, name) for name in (TILING, SLICING) if hasattr(vae, name)}
    processors = dict(unet.attn_processors) if plan.attention_slicing else None
    try:
        if TILING in saved:
            setattr(vae, TILING, plan.vae_tiling)
        if SLICING in saved:
            setattr(vae, SLICING, plan.vae_slicing)
        if processors is not None:
            unet.set_attention_slice("auto")
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
        if processors is not None:
            # set_attn_processor consumes the dict it is given.
            unet.set_attn_processor(dict(processors))
