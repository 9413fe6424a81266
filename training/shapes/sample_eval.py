"""Evaluation through diffusers pipelines: generate the fixed grids and score them with evaluate.py."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from .data import render
from .evaluate import accuracy, as_array, inpaint_grid, judge, prompt_grid, psnr, score
from .grammar import prompt_text

log = logging.getLogger(__name__)
P = TypeVar("P", bound=DiffusionPipeline)
BATCH = 16


def load_pipeline(cls: type[P], folder: Path) -> P:
    """Load a shapes folder the way the server does (no safety checker), in fp32."""
    pipe: P = cls.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def contact_sheet(images: list[Image.Image], path: Path, columns: int = 16) -> None:
    """Save the images as one grid PNG."""
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), (128, 128, 128))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def text_to_image(
    pipe: StableDiffusionPipeline, n: int, steps: int, guidance: float, seed: int = 0
) -> list[Image.Image]:
    """Generate the prompt grid (fixed prompts and seeds)."""
    items = prompt_grid(n, seed)
    images: list[Image.Image] = []
    for i in range(0, n, BATCH):
        chunk = items[i : i + BATCH]
        out = pipe(
            prompt=[prompt_text(g.attrs) for g in chunk],
            generator=_generators([g.seed for g in chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=64,
            width=64,
        )
        images += out.images
    return images


def score_text_to_image(images: list[Image.Image], n: int, seed: int = 0) -> dict[str, float]:
    """Accuracy of generated grid images."""
    return accuracy(score(judge(im), g.attrs) for im, g in zip(images, prompt_grid(n, seed), strict=True))


def eval_inpaint(
    pipe: StableDiffusionInpaintPipeline, n: int, steps: int, guidance: float, seed: int = 0, sheet: Path | None = None
) -> dict[str, float]:
    """Recolour accuracy inside the mask and PSNR of the raw output outside it."""
    items = inpaint_grid(n, seed)
    originals = [render(it.scene) for it in items]
    masks = [Image.fromarray(it.mask.astype(np.uint8) * 255, "L") for it in items]
    results: list[Image.Image] = []
    for i in range(0, n, BATCH):
        chunk = items[i : i + BATCH]
        out = pipe(
            prompt=[prompt_text(it.target) for it in chunk],
            image=originals[i : i + BATCH],
            mask_image=masks[i : i + BATCH],
            generator=_generators([it.seed for it in chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=64,
            width=64,
        )
        results += out.images
    judged = [judge(im) for im in results]
    per_image = [psnr(r, o, ~it.mask) for r, o, it in zip(results, originals, items, strict=True)]
    outside = np.concatenate(
        [(as_array(r) - as_array(o))[~it.mask].ravel() for r, o, it in zip(results, originals, items, strict=True)]
    )
    if sheet:
        contact_sheet([im for pair in zip(originals, results, strict=True) for im in pair], sheet)
    return {
        "recolour": float(np.mean([j.colour == it.target.colour for j, it in zip(judged, items, strict=True)])),
        "shape_kept": float(np.mean([j.shape == it.target.shape for j, it in zip(judged, items, strict=True)])),
        "psnr_outside_db": float(10 * np.log10(255.0**2 / max(float((outside**2).mean()), 1e-10))),
        "psnr_outside_db_worst": float(min(per_image)),
    }


def default_guidance(folder: Path) -> float:
    """The guidance scale a folder's sdserve.json sets as the service default (7.5 without one)."""
    meta = folder / "sdserve.json"
    return float(json.loads(meta.read_text()).get("default_guidance_scale", 7.5)) if meta.exists() else 7.5


def run_eval(
    model: Path,
    inpaint_model: Path | None,
    steps: int,
    n: int,
    sheets: Path | None = None,
    reference_unet: Path | None = None,
) -> dict[str, Any]:
    """All figures: t2i at the folder's default guidance, 7.5 and 1.0, optionally the fp32 reference UNet
    (at the default guidance), and inpainting (at its folder's default guidance)."""
    default = default_guidance(model)
    results: dict[str, Any] = {"steps": steps, "n": n, "scheduler": "DDIM", "default_guidance": default}
    pipe = load_pipeline(StableDiffusionPipeline, model)
    stored: list[Image.Image] = []
    for guidance in dict.fromkeys((default, 7.5, 1.0)):
        start = time.monotonic()
        images = text_to_image(pipe, n, steps, guidance)
        results[f"guidance_{guidance:g}"] = acc = score_text_to_image(images, n)
        log.info("stage=eval guidance=%g %s seconds=%.0f", guidance, acc, time.monotonic() - start)
        if sheets:
            contact_sheet(images, sheets / f"t2i-guidance-{guidance:g}.png")
        if guidance == default:
            stored = images
    if reference_unet is not None:
        # The shipped UNet is fp16; compare with the fp32 weights it was rounded from.
        pipe.unet = UNet2DConditionModel.from_pretrained(str(reference_unet), dtype=torch.float32)
        images = text_to_image(pipe, n, steps, default)
        results["fp32_reference"] = score_text_to_image(images, n)
        results["fp16_vs_fp32_psnr_db"] = float(np.mean([psnr(a, b) for a, b in zip(stored, images, strict=True)]))
        log.info("stage=eval fp32_reference %s", results["fp32_reference"])
    if inpaint_model is not None:
        start = time.monotonic()
        inpaint = load_pipeline(StableDiffusionInpaintPipeline, inpaint_model)
        sheet = sheets / "inpaint.png" if sheets else None
        results["inpaint_guidance"] = inpaint_guidance = default_guidance(inpaint_model)
        results["inpaint"] = eval_inpaint(inpaint, n, steps, inpaint_guidance, sheet=sheet)
        log.info("stage=eval inpaint %s seconds=%.0f", results["inpaint"], time.monotonic() - start)
    return results
