"""Runs evaluation grids through a live server with the Python client (bounded concurrency)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdserve import Client
from training.shapes.data import render
from training.shapes.evaluate import (
    GridItem,
    InpaintItem,
    accuracy,
    as_array,
    judge,
    psnr,
    score,
)
from training.shapes.grammar import prompt_text


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _parallel(jobs: Sequence[Callable[[], Image.Image]], concurrency: int) -> list[Image.Image]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda job: job(), jobs))


def text_to_image(client: Client, grid: Sequence[GridItem], concurrency: int = 8, **options: Any) -> dict[str, float]:
    """Accuracy per attribute of Generate over the grid (each item's own seed)."""
    jobs = [
        (lambda g=g: _image(client.generate(prompt_text(g.attrs), seed=g.seed, **options).image.data)) for g in grid
    ]
    images = _parallel(jobs, concurrency)
    return accuracy(score(judge(im), g.attrs) for im, g in zip(images, grid, strict=True))


def inpaint(client: Client, items: Sequence[InpaintItem], concurrency: int = 8, **options: Any) -> dict[str, float]:
    """Recolour accuracy inside the mask and PSNR outside it (pooled over the grid, and the worst image)."""
    originals = [render(it.scene) for it in items]
    masks = [Image.fromarray(it.mask.astype(np.uint8) * 255, "L") for it in items]
    jobs = [
        (
            lambda it=it, o=o, m=m: _image(
                client.inpaint(_png(o), _png(m), prompt_text(it.target), seed=it.seed, **options).image.data
            )
        )
        for it, o, m in zip(items, originals, masks, strict=True)
    ]
    results = _parallel(jobs, concurrency)
    judged = [judge(im) for im in results]
    outside = np.concatenate(
        [(as_array(r) - as_array(o))[~it.mask].ravel() for r, o, it in zip(results, originals, items, strict=True)]
    )
    mse = float((outside**2).mean())
    return {
        "recolour": float(np.mean([j.colour == it.target.colour for j, it in zip(judged, items, strict=True)])),
        "shape_kept": float(np.mean([j.shape == it.target.shape for j, it in zip(judged, items, strict=True)])),
        "psnr_outside_db": 100.0 if mse <= 1e-10 else float(10 * np.log10(255.0**2 / mse)),
        "psnr_outside_db_worst": float(
            min(psnr(r, o, ~it.mask) for r, o, it in zip(results, originals, items, strict=True))
        ),
    }


def edit(
    client: Client, grid: Sequence[GridItem], targets: Sequence[GridItem], concurrency: int = 8, **options: Any
) -> dict[str, float]:
    """Edit of ground-truth renders: PSNR to the input at strength 0.3, and prompt accuracy (against a
    different prompt) at strength 1.0."""
    import random

    from training.shapes.data import place

    sources = [render(place(g.attrs, random.Random(g.seed))) for g in grid]
    keep_jobs = [
        (
            lambda s=s, g=g: _image(
                client.edit(_png(s), prompt_text(g.attrs), strength=0.3, seed=g.seed, **options).image.data
            )
        )
        for s, g in zip(sources, grid, strict=True)
    ]
    kept = _parallel(keep_jobs, concurrency)
    move_jobs = [
        (
            lambda s=s, t=t: _image(
                client.edit(_png(s), prompt_text(t.attrs), strength=1.0, seed=t.seed, **options).image.data
            )
        )
        for s, t in zip(sources, targets, strict=True)
    ]
    moved = _parallel(move_jobs, concurrency)
    moved_acc = accuracy(score(judge(im), t.attrs) for im, t in zip(moved, targets, strict=True))
    return {
        "psnr_to_input_at_0.3_db": float(np.mean([psnr(k, s) for k, s in zip(kept, sources, strict=True)])),
        **{f"strength_1.0_{k}": v for k, v in moved_acc.items()},
    }
