"""Measures a variant's quality: PSNR of its image against the fp32 variant's image for the same seed."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdserve_core import families
from sdserve_core.components import load_components
from sdserve_core.model_folder import native_size
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import run
from sdserve_core.tasks import Task

PROMPT = "a red cube and a blue sphere on a wooden table, studio light"
SEED = 0
PSNR_IDENTICAL = 100.0


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """What to render: size in pixels (0: the model's default), steps, seed and device."""

    size: int
    steps: int
    seed: int = SEED
    device: str = "cpu"


def default_size(folder: Path) -> int:
    """The model's native image size in pixels (UNet sample size times the VAE's scale factor)."""
    return native_size(folder)[0]


def compute_dtype(variant: str, device: str) -> torch.dtype:
    """float32 on CPU (so the measurement isolates the stored weights' error); the variant's own dtype on GPUs."""
    if not device.startswith("cuda"):
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float16}.get(variant, torch.float32)


def _inpaint_inputs(size: int) -> tuple[Image.Image, Image.Image]:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(rgb.astype(np.uint8)), Image.fromarray(mask)


# How much of the schedule an Edit quality render (a refiner's) runs: half, and at least one step.
EDIT_STRENGTH = 0.5


def quality_call(folder: Path, size: int, steps: int, seed: int) -> PipelineCall:
    """The call a folder's quality is measured with: Generate when the model can (from noise alone), else Edit of
    a fixed gradient image (an SDXL refiner: it was trained on the low-noise end of the schedule only), else Inpaint
    of its centre (inpainting models)."""
    tasks = families.traits_of(folder).tasks
    task = Task.GENERATE if Task.GENERATE in tasks else Task.EDIT if Task.EDIT in tasks else Task.INPAINT
    image, mask = _inpaint_inputs(size)
    return PipelineCall(
        task=task,
        steps=steps,
        width=size,
        height=size,
        generators=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        guidance_scale=7.5,
        prompt=PROMPT,
        images=None if task is Task.GENERATE else image,
        masks=mask if task is Task.INPAINT else None,
        strength=max(EDIT_STRENGTH, 1.0 / steps) if task is Task.EDIT else None,
    )


_RENDER_LOCK = threading.Lock()


def render(folder: Path, variant: str, spec: RenderSpec) -> np.ndarray:
    """The variant's image for `spec` as float32 RGB in [0, 1] (H, W, 3), rendered with DDIM (the folder's
    scheduler config) through the server's own pipeline path (sdserve_core.pipeline)."""
    from diffusers import DDIMScheduler

    size = spec.size or default_size(folder)
    call = quality_call(folder, size, spec.steps, spec.seed)
    # Renders share torch's thread pool; one at a time keeps them from starving each other and the server.
    with _RENDER_LOCK, torch.inference_mode():
        components = load_components(folder, variant, compute_dtype(variant, spec.device), spec.device)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        out = run(components, call, scheduler)[0]
    return np.asarray(out, dtype=np.float32)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]; PSNR_IDENTICAL when they are equal."""
    mse = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_IDENTICAL
    return min(PSNR_IDENTICAL, 10.0 * math.log10(1.0 / mse))
