"""Measures a variant's quality: PSNR of its image against the fp32 variant's image for the same seed."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdserve_core import quant

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
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, list) else int(sample)
    return int(sample * 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1))


def compute_dtype(variant: str, device: str) -> torch.dtype:
    """float32 on CPU (so the measurement isolates the stored weights' error); the variant's own dtype on GPUs."""
    if not device.startswith("cuda"):
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float16}.get(variant, torch.float32)


def load_components(folder: Path, variant: str, device: str) -> dict[str, Any]:
    """The pipeline components of a stored variant (int8 through quant.load_int8_component); safetensors only."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = compute_dtype(variant, device)
    common: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
    if variant == "int8":
        unet = quant.load_int8_component(UNet2DConditionModel, folder, "unet", dtype, device)
        text_encoder = quant.load_int8_component(CLIPTextModel, folder, "text_encoder", dtype, device)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common).to(device)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **common).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common).to(device)
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "vae": vae,
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler": DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _inpaint_inputs(size: int) -> tuple[Any, Any]:
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)], -1)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(rgb.astype(np.uint8)), Image.fromarray(mask)


_RENDER_LOCK = threading.Lock()


def render(folder: Path, variant: str, spec: RenderSpec) -> np.ndarray:
    """The variant's image for `spec` as float32 RGB in [0, 1] (H, W, 3)."""
    import diffusers

    size = spec.size or default_size(folder)
    # Renders share torch's thread pool; one at a time keeps them from starving each other and the server.
    with _RENDER_LOCK, torch.inference_mode():
        components = load_components(folder, variant, spec.device)
        in_channels = int(components["unet"].config.in_channels)
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        common: dict[str, Any] = {
            "prompt": PROMPT,
            "num_inference_steps": spec.steps,
            "guidance_scale": 7.5,
            "height": size,
            "width": size,
            "generator": generator,
            "output_type": "np",
        }
        if in_channels == 9:
            pipe = diffusers.StableDiffusionInpaintPipeline(**components)
            image, mask = _inpaint_inputs(size)
            common.update(image=image, mask_image=mask)
        else:
            pipe = diffusers.StableDiffusionPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(**common).images[0]
    return np.asarray(out, dtype=np.float32)


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]; PSNR_IDENTICAL when they are equal."""
    mse = float(np.mean((reference.astype(np.float64) - other.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_IDENTICAL
    return min(PSNR_IDENTICAL, 10.0 * math.log10(1.0 / mse))
