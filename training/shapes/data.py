"""Deterministic procedural data: random prompts, their 64x64 renders and inpainting masks.

Geometry (image side S = 64 px, continuous coordinates 0..S, thirds at S/3 and 2S/3):
- Every shape has a square bounding box of side `side`; circles fill it, squares are it,
  triangles point up with their base on its bottom edge. The shape's centre is the box centre.
- "small": side 15-30% of S; "large": side 45-60% of S; no size word: side 15-60% of S.
- A position puts the centre in one cell of the 3x3 grid of thirds: "in the centre" the middle
  cell, "on the left" / "on the right" the left / right column of the middle row, "at the top" /
  "at the bottom" the top / bottom row of the middle column. No position word: the centre is
  anywhere the whole shape fits. Centres keep 1 px from cell edges and shapes 1 px from the
  image border, so every render is unambiguous.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from .grammar import ALL_COLOURS, COLOURS, POSITION_CELLS, POSITIONS, SHAPES, SIZES, Attributes

SIZE = 64
THIRD = SIZE / 3
SIDE_RANGE: dict[str | None, tuple[float, float]] = {
    "small": (0.15 * SIZE, 0.30 * SIZE),
    "large": (0.45 * SIZE, 0.60 * SIZE),
    None: (0.15 * SIZE, 0.60 * SIZE),
}
_BORDER = 1.0
_CELL_MARGIN = 1.0
_SUPERSAMPLE = 4
P_SIZE_WORD = 0.7
P_POSITION_WORD = 0.7

Mask = NDArray[np.bool_]


@dataclass(frozen=True)
class Scene:
    """A prompt's attributes plus the concrete geometry of one render."""

    attrs: Attributes
    side: float
    cx: float
    cy: float


def random_attributes(rng: random.Random) -> Attributes:
    """Draw prompt attributes from the training distribution."""
    colour, background = rng.sample(sorted(COLOURS), 2)
    size = rng.choice(SIZES) if rng.random() < P_SIZE_WORD else None
    position = rng.choice(sorted(POSITIONS)) if rng.random() < P_POSITION_WORD else None
    return Attributes(rng.choice(SHAPES), colour, background, size, position)


def attributes_with(rng: random.Random, new: Sequence[str], others: Sequence[str]) -> Attributes:
    """Draw attributes like random_attributes, but with one of the new colours (the adapters' training data): in
    the shape half the time, else in the background; the other slot takes a different colour from others."""
    colour = rng.choice(sorted(new))
    other = rng.choice(sorted(c for c in others if c != colour))
    if rng.random() >= 0.5:
        colour, other = other, colour
    size = rng.choice(SIZES) if rng.random() < P_SIZE_WORD else None
    position = rng.choice(sorted(POSITIONS)) if rng.random() < P_POSITION_WORD else None
    return Attributes(rng.choice(SHAPES), colour, other, size, position)


def _axis_range(cell: int | None, side: float) -> tuple[float, float]:
    lo, hi = side / 2 + _BORDER, SIZE - side / 2 - _BORDER
    if cell is not None:
        lo = max(lo, cell * THIRD + _CELL_MARGIN)
        hi = min(hi, (cell + 1) * THIRD - _CELL_MARGIN)
    return lo, hi


def place(attrs: Attributes, rng: random.Random) -> Scene:
    """Choose a side and centre that satisfy the attributes."""
    side = rng.uniform(*SIDE_RANGE[attrs.size])
    col, row = POSITION_CELLS[attrs.position] if attrs.position else (None, None)
    cx = rng.uniform(*_axis_range(col, side))
    cy = rng.uniform(*_axis_range(row, side))
    return Scene(attrs, side, cx, cy)


def random_scene(rng: random.Random) -> Scene:
    """Draw a prompt and a geometry for it."""
    return place(random_attributes(rng), rng)


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 64x64 RGB image (box-filtered 4x supersampling); the adapters' colours render too."""
    k = _SUPERSAMPLE
    big = Image.new("RGB", (SIZE * k, SIZE * k), ALL_COLOURS[scene.attrs.background])
    draw = ImageDraw.Draw(big)
    h = scene.side / 2
    x0, y0, x1, y1 = ((scene.cx - h) * k, (scene.cy - h) * k, (scene.cx + h) * k, (scene.cy + h) * k)
    fill = ALL_COLOURS[scene.attrs.colour]
    if scene.attrs.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.attrs.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def render_dataset(seed: int, n: int) -> tuple[NDArray[np.uint8], list[Scene]]:
    """Render n random scenes (item i depends only on seed and i)."""
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        scene = random_scene(random.Random(f"shapes:{seed}:{i}"))
        images[i] = np.asarray(render(scene))
        scenes.append(scene)
    return images, scenes


def box_mask(x0: float, y0: float, x1: float, y1: float) -> Mask:
    """Mask of the pixels whose centres lie in the box (clipped to the image)."""
    c = np.arange(SIZE) + 0.5
    xs = (c >= x0) & (c <= x1)
    ys = (c >= y0) & (c <= y1)
    return np.asarray(ys[:, None] & xs[None, :], dtype=np.bool_)


def shape_box_mask(scene: Scene, margin: float) -> Mask:
    """Mask of the shape's bounding box grown by margin pixels."""
    h = scene.side / 2 + margin
    return box_mask(scene.cx - h, scene.cy - h, scene.cx + h, scene.cy + h)


def random_mask(scene: Scene, rng: random.Random) -> Mask:
    """Sample an inpainting mask: the shape, the background around it, random boxes or everything."""
    u = rng.random()
    if u < 0.55:
        return shape_box_mask(scene, rng.uniform(1, 6))
    if u < 0.70:
        return ~shape_box_mask(scene, rng.uniform(1, 6))
    if u < 0.95:
        mask = np.zeros((SIZE, SIZE), dtype=np.bool_)
        for _ in range(rng.choice((1, 1, 2))):
            w, h = rng.uniform(8, 48), rng.uniform(8, 48)
            x0, y0 = rng.uniform(-4, SIZE - w + 4), rng.uniform(-4, SIZE - h + 4)
            mask |= box_mask(x0, y0, x0 + w, y0 + h)
        return mask
    return np.ones((SIZE, SIZE), dtype=np.bool_)
