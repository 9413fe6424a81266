"""Scores the shapes adapters (models/adapters/: the LoRA LORA_NAME, e.g. `shapes-cream-teal`, the embedding
TI_NAME, e.g. `shapes-maroon`) through a live sdserve server that serves them, with the Python client.

The grids are those of training/shapes/adapter_eval.py (the figures on the adapters' model cards come from the
same grids through plain diffusers): prompts with the LoRA's two colours at scale 1, the base prompt grid without
the LoRA, with it at scale 1 and at scale 0, and prompts with the embedding's colour written with its token TI_TOKEN
(an embedding applies wherever its token appears; it is not named in `adapters`). Adapter grids are judged against
the base colours plus the three adapter colours, the base grid against the base colours.

Every adapter run was chosen by its figures on those grids (the tuning grids), which therefore read high; the same
figures on the fresh grids (adapter_eval.FRESH_SEED, `fresh_n` prompts each; no run was ever chosen on them) come
under "fresh", and the targets are judged on them when they are measured.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdserve import Client
from training.shapes.adapter_eval import FRESH_SEED, base_accuracy, lora_grid, new_colour_accuracy, ti_grid
from training.shapes.adapters import LORA_NAME
from training.shapes.evaluate import GridItem, prompt_grid
from training.shapes.grammar import LORA_COLOURS, PROMPT_WORDS, TI_COLOUR, TI_TOKEN, prompt_text

TARGETS = {"lora_new_colour": 0.90, "ti_new_colour": 0.80, "base_drop_points": 5.0}
Adapters = list[tuple[str, float]]
# Base-grid items compared pixel for pixel, without the LoRA and with it at scale 0 (each request alone).
IDENTITY_ITEMS = 8


def _raw(client: Client, grid: Sequence[GridItem], adapters: Adapters, concurrency: int, **options: Any) -> list[bytes]:
    """The PNG bytes of each grid item's image (its own seed), with the given LoRAs for every request."""

    def one(g: GridItem) -> bytes:
        extra: dict[str, Any] = {"adapters": adapters} if adapters else {}
        result = client.generate(prompt_text(g.attrs, PROMPT_WORDS), seed=g.seed, **options, **extra)
        data: bytes = result.image.data
        return data

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, grid))


def _images(raw: Sequence[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in raw]


def _same_pixels(a: Sequence[bytes], b: Sequence[bytes]) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(_images(a), _images(b), strict=True))


def evaluate_adapters(
    target: str, n: int, steps: int, model: str = "", concurrency: int = 8, lora: str = LORA_NAME, fresh_n: int = 0
) -> dict[str, Any]:
    """Adapter figures through the server at `target`: LoRA new-colour accuracy at scale 1, whether scale 0 gives the
    no-LoRA images (pixels), base-grammar accuracy without and with the LoRA (and the drop in points), and the
    embedding's accuracy on TI_TOKEN prompts; with fresh_n, the same (but scale 0) on the fresh grids under "fresh";
    `misses` lists the targets not met."""
    opts: dict[str, Any] = {"steps": steps, **({"model": model} if model else {})}
    with Client(target) as client:

        def run(grid: Sequence[GridItem], adapters: Adapters, concurrency: int = concurrency) -> list[bytes]:
            return _raw(client, grid, adapters, concurrency, **opts)

        out = _figures(run, n, 0, lora_grid(n), ti_grid(n), lora)
        # Scale 0 against no LoRA one request at a time: batched, an image's last bits depend on the batch it
        # shared (the contract's 1/255), and the two runs need not batch alike.
        alone = prompt_grid(n, seed=0)[:IDENTITY_ITEMS]
        plain_alone, at_zero = run(alone, [], 1), run(alone, [(lora, 0.0)], 1)
        if fresh_n:
            fresh = (lora_grid(fresh_n, FRESH_SEED), ti_grid(fresh_n, seed=FRESH_SEED))
            out["fresh"] = {**_figures(run, fresh_n, FRESH_SEED, *fresh, lora), "seed": FRESH_SEED}
    out.update(
        steps=steps,
        lora_scale_0_identical=_same_pixels(at_zero, plain_alone),
        lora_scale_0_identical_bytes=list(at_zero) == list(plain_alone),
    )
    out["misses"] = misses(out)
    return out


def _figures(
    run: Callable[[Sequence[GridItem], Adapters], list[bytes]],
    n: int,
    seed: int,
    new_grid: Sequence[GridItem],
    ti: Sequence[GridItem],
    lora: str,
) -> dict[str, Any]:
    """The LoRA's new colours, the base prompt grid (seed) without and with it, and the embedding's colour."""
    base_grid = prompt_grid(n, seed=seed)
    without = base_accuracy(_images(run(base_grid, [])), base_grid)
    active = base_accuracy(_images(run(base_grid, [(lora, 1.0)])), base_grid)
    return {
        "n": n,
        "lora_scale_1": new_colour_accuracy(_images(run(new_grid, [(lora, 1.0)])), new_grid, tuple(LORA_COLOURS)),
        "base_without_lora": without,
        "base_with_lora": active,
        "base_drop_points": {k: round(100 * (without[k] - active[k]), 2) for k in without},
        "ti": new_colour_accuracy(_images(run(ti, [])), ti, (TI_COLOUR,)),
    }


def misses(results: dict[str, Any]) -> list[str]:
    """The adapter targets the results miss: judged on the fresh grids where they were measured (the scale-0 identity
    on the tuning grid's items)."""
    out = []
    figures = results.get("fresh", results)
    if figures["lora_scale_1"]["new_colour"] < TARGETS["lora_new_colour"]:
        out.append(f"LoRA new colours {100 * figures['lora_scale_1']['new_colour']:.1f}% < 90%")
    if figures["ti"]["new_colour"] < TARGETS["ti_new_colour"]:
        out.append(f"{TI_TOKEN} {100 * figures['ti']['new_colour']:.1f}% < 80%")
    worst = max((v for k, v in figures["base_drop_points"].items() if k != "all"), default=0.0)
    if worst > TARGETS["base_drop_points"]:
        out.append(f"base prompts lose {worst:.1f} points with the LoRA (> 5)")
    if not results["lora_scale_0_identical"]:
        out.append("LoRA at scale 0 changes the pixels")
    return out
