"""Scores the shapes adapters (models/adapters/: the LoRA LORA_NAME, e.g. `shapes-cream-teal`, the embedding
TI_NAME, e.g. `shapes-maroon`) through a live sdserve server that serves them, with the Python client.

The grids are those of training/shapes/adapter_eval.py (the figures on the adapters' model cards come from the
same grids through plain diffusers): prompts with the LoRA's two colours at scale 1, the base prompt grid without
the LoRA, with it at scale 1 and at scale 0, and prompts with the embedding's colour written with its token TI_TOKEN
(an embedding applies wherever its token appears; it is not named in `adapters`). Adapter grids are judged against
the base colours plus the three adapter colours, the base grid against the base colours.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdserve import Client
from training.shapes.adapter_eval import base_accuracy, lora_grid, new_colour_accuracy, ti_grid
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
    target: str, n: int, steps: int, model: str = "", concurrency: int = 8, lora: str = LORA_NAME
) -> dict[str, Any]:
    """Adapter figures through the server at `target`: LoRA new-colour accuracy at scale 1, whether scale 0 gives the
    no-LoRA images (pixels), base-grammar accuracy without and with the LoRA (and the drop in points), and the
    embedding's accuracy on TI_TOKEN prompts; `misses` lists the targets not met."""
    opts: dict[str, Any] = {"steps": steps, **({"model": model} if model else {})}
    base_grid = prompt_grid(n, seed=0)
    with Client(target) as client:

        def run(grid: Sequence[GridItem], adapters: Adapters) -> list[bytes]:
            return _raw(client, grid, adapters, concurrency, **opts)

        plain = run(base_grid, [])
        at_one = run(base_grid, [(lora, 1.0)])
        # Scale 0 against no LoRA one request at a time: batched, an image's last bits depend on the batch it
        # shared (the contract's 1/255), and the two runs need not batch alike.
        alone = base_grid[:IDENTITY_ITEMS]
        plain_alone = _raw(client, alone, [], 1, **opts)
        at_zero = _raw(client, alone, [(lora, 0.0)], 1, **opts)
        new = run(lora_grid(n), [(lora, 1.0)])
        ti = run(ti_grid(n), [])
    without, active = base_accuracy(_images(plain), base_grid), base_accuracy(_images(at_one), base_grid)
    out: dict[str, Any] = {
        "n": n,
        "steps": steps,
        "lora_scale_1": new_colour_accuracy(_images(new), lora_grid(n), tuple(LORA_COLOURS)),
        "lora_scale_0_identical": _same_pixels(at_zero, plain_alone),
        "lora_scale_0_identical_bytes": list(at_zero) == list(plain_alone),
        "base_without_lora": without,
        "base_with_lora": active,
        "base_drop_points": {k: round(100 * (without[k] - active[k]), 2) for k in without},
        "ti": new_colour_accuracy(_images(ti), ti_grid(n), (TI_COLOUR,)),
    }
    out["misses"] = misses(out)
    return out


def misses(results: dict[str, Any]) -> list[str]:
    """The adapter targets the results miss."""
    out = []
    if results["lora_scale_1"]["new_colour"] < TARGETS["lora_new_colour"]:
        out.append(f"LoRA new colours {100 * results['lora_scale_1']['new_colour']:.1f}% < 90%")
    if results["ti"]["new_colour"] < TARGETS["ti_new_colour"]:
        out.append(f"{TI_TOKEN} {100 * results['ti']['new_colour']:.1f}% < 80%")
    worst = max((v for k, v in results["base_drop_points"].items() if k != "all"), default=0.0)
    if worst > TARGETS["base_drop_points"]:
        out.append(f"base prompts lose {worst:.1f} points with the LoRA (> 5)")
    if not results["lora_scale_0_identical"]:
        out.append("LoRA at scale 0 changes the pixels")
    return out
