"""Where a shapes family loses geometry: per-class scores and box fill at each stage an image passes.

    python -m training.shapes.probe --model models/shapes [--n 96] [--guidance G] [--strengths 0.3,0.5,0.7]
                                    [--steps 20] [--sheet PNG] [--json PATH]

For the prompt grid of `make eval` it scores, class by class (circle, square, triangle), how many images are
judged the class they asked for and their mean box fill (the scorer calls a square from 0.9; circles fill
0.785): the exact renders of the grid's scenes (a scorer self-check: 100%), the same renders encoded and
decoded by the VAE, the renders edited (img2img, DDIM) with their own prompt at each strength, and images
generated from noise. A stage that keeps exact renders right but loses them at a low edit strength points
at the UNet's denoising of nearly clean latents, not at the VAE or at the layout the first steps choose.
`--sheet` writes the square prompts as a picture: one row per stage, in the order above.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from .data import place, render
from .evaluate import GridItem, judge, prompt_grid
from .grammar import SHAPES, prompt_text
from .sample_eval import BATCH, _generators, contact_sheet, default_guidance, load_pipeline, text_to_image
from .tensors import to_images, to_tensor

log = logging.getLogger("training.shapes.probe")
SHEET_COLUMNS = 8


def class_figures(images: list[Image.Image], items: list[GridItem]) -> dict[str, dict[str, float]]:
    """Per asked-for shape: images judged that shape, images asked, mean box fill of the judged blob."""
    out: dict[str, dict[str, float]] = {}
    for shape in SHAPES:
        judged = [judge(im) for im, it in zip(images, items, strict=True) if it.attrs.shape == shape]
        if judged:
            out[shape] = {
                "right": sum(j.shape == shape for j in judged),
                "of": len(judged),
                "fill": round(float(np.mean([j.fill for j in judged])), 3),
            }
    return out


def exact_renders(items: list[GridItem]) -> list[Image.Image]:
    """The grid's scenes drawn exactly (the scenes `ground_truth_accuracy` checks the scorer on)."""
    return [render(place(it.attrs, random.Random(it.seed))) for it in items]


@torch.no_grad()
def round_trip(pipe: StableDiffusionPipeline, images: list[Image.Image]) -> list[Image.Image]:
    """Encode to the posterior mean and decode again, as the UNets' training targets are means."""
    x = to_tensor(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    return to_images(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample)


def edit(
    pipe: StableDiffusionImg2ImgPipeline,
    images: list[Image.Image],
    items: list[GridItem],
    strength: float,
    steps: int,
    guidance: float,
) -> list[Image.Image]:
    """img2img of each exact render with its own prompt and the grid's seed."""
    out: list[Image.Image] = []
    for i in range(0, len(items), BATCH):
        chunk = items[i : i + BATCH]
        out += pipe(
            prompt=[prompt_text(it.attrs) for it in chunk],
            image=images[i : i + BATCH],
            strength=strength,
            generator=_generators([it.seed for it in chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance,
        ).images
    return out


def probe(
    model: Path, n: int, steps: int, guidance: float | None, strengths: list[float], sheet: Path | None = None
) -> dict[str, Any]:
    """All stages' per-class figures for one text-to-image folder."""
    guidance = default_guidance(model) if guidance is None else guidance
    pipe = load_pipeline(StableDiffusionPipeline, model)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    items = prompt_grid(n)
    exact = exact_renders(items)
    rows: dict[str, list[Image.Image]] = {"exact": exact, "round_trip": round_trip(pipe, exact)}
    for s in strengths:
        rows[f"edit_{s:g}"] = edit(img2img, exact, items, s, steps, guidance)
    rows["generated"] = text_to_image(pipe, n, steps, guidance)
    figures: dict[str, Any] = {"model": str(model), "n": n, "steps": steps, "guidance": guidance}
    for name, images in rows.items():
        figures[name] = class_figures(images, items)
        log.info("%s %s", name, figures[name])
    if sheet is not None:
        squares = [i for i, it in enumerate(items) if it.attrs.shape == "square"][:SHEET_COLUMNS]
        if squares:
            big = (128, 128)
            cells = [images[i].resize(big, Image.Resampling.NEAREST) for images in rows.values() for i in squares]
            contact_sheet(cells, sheet, columns=len(squares))
    return figures


def _strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--strengths: comma-separated numbers expected, got {text!r}") from e
    bad = [v for v in values if not 0 < v <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"--strengths: each strength must be in (0, 1], got {bad[0]:g}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    p = argparse.ArgumentParser(prog="python -m training.shapes.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/shapes"), help="text-to-image folder")
    p.add_argument("--n", type=_positive, default=96, help="grid prompts (cycling circle, square, triangle)")
    p.add_argument("--steps", type=_positive, default=20, help="DDIM steps for edits and generation")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the folder's)")
    p.add_argument("--strengths", type=_strengths, default=[0.3, 0.5, 0.7], help="img2img strengths, in (0, 1]")
    p.add_argument("--sheet", type=Path, default=None, help="write the square prompts' stages as one PNG")
    p.add_argument("--json", type=Path, default=None, help="write the figures here as well as to the log")
    args = p.parse_args(argv)
    if not (args.model / "model_index.json").exists():
        p.error(f"--model: no diffusers folder (model_index.json) at {args.model}")
    too_weak = [s for s in args.strengths if int(s * args.steps) < 1]
    if too_weak:
        p.error(f"--strengths: {too_weak[0]:g} of --steps {args.steps} is no denoising step (strength x steps >= 1)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    figures = probe(args.model, args.n, args.steps, args.guidance, args.strengths, args.sheet)
    text = json.dumps(figures, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
