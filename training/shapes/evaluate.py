"""Pure pixel scorer for shapes images, fixed prompt grids and accuracy aggregation.

Nothing here knows how an image was produced: give it a PIL image and what the prompt asked for.
Judging rules (64x64 image, thirds at 64/3):
- background: the palette colour most border pixels are nearest to;
- shape colour: the most common non-background palette colour among pixels far from the background;
- coverage alpha: each pixel's projection on the background-to-shape colour line, in [0, 1];
  the shape is the largest 4-connected blob of alpha > 0.5;
- shape class: "triangle" when under 37.5% of its alpha mass lies in the top half of its box
  (an upward triangle has 25%, circles and squares 50%), else "square" when alpha fills over 90%
  of the box (circles fill 78.5%), else "circle";
- size: box side from soft extents (sum of per-column / per-row maximum alpha); "small" when at
  most 30% of the side + 1 px, "large" when at least 45% - 1 px, else "medium";
- position: the 3x3 grid cell of the thresholded box centre (named like the prompt positions,
  corners as "top-left" etc.).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from .data import SIZE, THIRD, Mask, Scene, place, render, shape_box_mask
from .grammar import ALL_COLOURS, COLOURS, POSITION_CELLS, POSITIONS, SHAPES, Attributes

Palette = Mapping[str, tuple[int, int, int]]
# The adapters' scoring palette (opt-in; judge's default is the base COLOURS).
EXTENDED_PALETTE: Palette = ALL_COLOURS
_FAR_FROM_BACKGROUND = 48.0
_CELL_NAMES = {cell: name for name, cell in POSITION_CELLS.items()}
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "middle", "right")
SMALL_MAX = 0.30 * SIZE + 1
LARGE_MIN = 0.45 * SIZE - 1
ATTRIBUTES = ("background", "colour", "shape", "size", "position")

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Judgement:
    """What the pixels show; shape fields are None when no shape was found."""

    background: str
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    side: float = 0.0
    cx: float = 0.0
    cy: float = 0.0
    fill: float = 0.0
    top_fraction: float = 0.0


@lru_cache(maxsize=8)
def _palette_array(items: tuple[tuple[str, tuple[int, int, int]], ...]) -> FloatArray:
    return np.array([rgb for _, rgb in items], dtype=np.float32)


def _nearest(pixels: FloatArray, palette: FloatArray) -> NDArray[np.intp]:
    d = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    return np.asarray(d.argmin(-1))


def _mode(labels: NDArray[np.intp], size: int) -> int:
    return int(np.bincount(labels, minlength=size).argmax())


def _largest_blob(mask: Mask) -> Mask:
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, blob = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    for y, x in best:
        out[y, x] = True
    return out


def _position_name(cx: float, cy: float) -> str:
    col, row = min(2, int(cx // THIRD)), min(2, int(cy // THIRD))
    if (col, row) in _CELL_NAMES:
        return _CELL_NAMES[(col, row)]
    return f"{_ROWS[row]}-{_COLS[col]}"


def as_array(image: Image.Image) -> FloatArray:
    """A 64x64 RGB float array of the image (resized with a box filter if needed)."""
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def judge(image: Image.Image, palette: Palette | None = None) -> Judgement:
    """Measure background, shape colour, class, size and position from the pixels. Colours are named from palette:
    the 8 base colours unless given (the adapters' evals pass EXTENDED_PALETTE: the base colours plus the adapters'
    maroon, cream and teal)."""
    names = list(palette or COLOURS)
    rgb = _palette_array(tuple((n, (palette or COLOURS)[n]) for n in names))
    a = as_array(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    border_labels = _nearest(border, rgb)
    bg_label = _mode(border_labels, len(names))
    bg = np.median(border[border_labels == bg_label], axis=0)
    flat = a.reshape(-1, 3)
    far = np.linalg.norm(flat - bg, axis=-1) > _FAR_FROM_BACKGROUND
    labels = _nearest(flat[far], rgb)
    labels = labels[labels != bg_label]
    if labels.size < 4:
        return Judgement(background=names[bg_label])
    fg_label = _mode(labels, len(names))
    fg = np.median(flat[far][_nearest(flat[far], rgb) == fg_label], axis=0)
    d = fg - bg
    alpha = np.clip(((a - bg) @ d) / float(d @ d), 0.0, 1.0)
    return _measure_shape(alpha, names[bg_label], names[fg_label])


def _measure_shape(alpha: FloatArray, background: str, colour: str) -> Judgement:
    """Class, size and position of the shape from its coverage alpha."""
    blob = _largest_blob(alpha > 0.5)
    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    win = alpha[max(0, y0 - 1) : y1 + 2, max(0, x0 - 1) : x1 + 2]
    w, h = float(win.max(0).sum()), float(win.max(1).sum())
    side = max(w, h)
    area = float(win.sum())
    fill = area / max(w * h, 1e-6)
    rows = np.arange(win.shape[0]) + max(0, y0 - 1) + 0.5
    top_fraction = float(win[rows < cy].sum()) / max(area, 1e-6)
    if top_fraction < 0.375:
        shape = "triangle"
    elif fill > 0.9:
        shape = "square"
    else:
        shape = "circle"
    size = "small" if side <= SMALL_MAX else "large" if side >= LARGE_MIN else "medium"
    return Judgement(
        background=background,
        colour=colour,
        shape=shape,
        size=size,
        position=_position_name(cx, cy),
        side=side,
        cx=cx,
        cy=cy,
        fill=fill,
        top_fraction=top_fraction,
    )


def score(j: Judgement, attrs: Attributes) -> dict[str, bool]:
    """Per-attribute correctness; size and position only when the prompt names them."""
    out = {
        "background": j.background == attrs.background,
        "colour": j.colour == attrs.colour,
        "shape": j.shape == attrs.shape,
    }
    if attrs.size:
        out["size"] = j.size == attrs.size
    if attrs.position:
        out["position"] = j.position == attrs.position
    return out


def accuracy(scores: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Fraction correct per attribute over the scores that judged it, plus "all" (every attribute right)."""
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for s in scores:
        for key, ok in [*s.items(), ("all", all(s.values()))]:
            total[key] += 1
            right[key] += int(ok)
    return {k: right[k] / total[k] for k in [*ATTRIBUTES, "all"] if total[k]}


@dataclass(frozen=True)
class GridItem:
    """One evaluation case: what to ask for and the sampling seed."""

    attrs: Attributes
    seed: int


def prompt_grid(n: int, seed: int = 0) -> list[GridItem]:
    """A fixed, balanced set of prompts (cycling shapes, sizes, positions) with fixed seeds."""
    rng = random.Random(f"grid:{seed}")
    sizes: list[str | None] = ["small", "large", None]
    positions: list[str | None] = [*POSITIONS, None]
    items = []
    for i in range(n):
        colour, background = rng.sample(sorted(COLOURS), 2)
        attrs = Attributes(SHAPES[i % 3], colour, background, sizes[(i // 3) % 3], positions[(i // 9) % 6])
        items.append(GridItem(attrs, 1000 * (seed + 1) + i))
    return items


ADAPTER_GRID_SEED = 50_000


def adapter_grid(n: int, new: Sequence[str], others: Sequence[str], seed: int = 0) -> list[GridItem]:
    """Fixed prompts for an adapter's colours: item i has new[(i // 2) % len(new)] as its shape colour (even i)
    or background (odd i), the other slot drawn from others; shapes, sizes and positions cycle as in
    prompt_grid, and the sampling seeds (ADAPTER_GRID_SEED + 1000 * seed + i) are none of prompt_grid's."""
    rng = random.Random(f"adapter-grid:{seed}:{','.join(new)}")
    sizes: list[str | None] = ["small", "large", None]
    positions: list[str | None] = [*POSITIONS, None]
    items = []
    for i in range(n):
        colour = new[(i // 2) % len(new)]
        other = rng.choice(sorted(c for c in others if c != colour))
        colour, background = (colour, other) if i % 2 == 0 else (other, colour)
        attrs = Attributes(SHAPES[i % 3], colour, background, sizes[(i // 3) % 3], positions[(i // 9) % 6])
        items.append(GridItem(attrs, ADAPTER_GRID_SEED + 1000 * seed + i))
    return items


@dataclass(frozen=True)
class InpaintItem:
    """One recolour case: the original image, the mask over its shape and the new prompt."""

    scene: Scene
    mask: Mask
    target: Attributes
    seed: int


def inpaint_grid(n: int, seed: int = 0, margin: float = 3.0) -> list[InpaintItem]:
    """Fixed recolour cases: each original shape is masked (box + margin) and asked for in a new colour."""
    items = []
    for g in prompt_grid(n, seed + 7):
        rng = random.Random(f"inpaint:{seed}:{g.seed}")
        scene = place(g.attrs, rng)
        new = rng.choice([c for c in COLOURS if c not in (g.attrs.colour, g.attrs.background)])
        target = Attributes(g.attrs.shape, new, g.attrs.background, g.attrs.size, g.attrs.position)
        items.append(InpaintItem(scene, shape_box_mask(scene, margin), target, g.seed))
    return items


def psnr(a: Image.Image, b: Image.Image, region: Mask | None = None) -> float:
    """PSNR in dB between two images over the region (whole image when None), capped at 100."""
    diff = (as_array(a) - as_array(b))[region if region is not None else slice(None)]
    mse = float((diff**2).mean())
    return 100.0 if mse <= 1e-10 else float(10 * np.log10(255.0**2 / mse))


def ground_truth_accuracy(n: int, seed: int = 0) -> dict[str, float]:
    """Scorer self-check: accuracy on exact renders of the grid and on n random training scenes."""
    from .data import random_scene

    scores = [score(judge(render(place(g.attrs, random.Random(g.seed)))), g.attrs) for g in prompt_grid(n, seed)]
    for i in range(n):
        scene = random_scene(random.Random(f"gt:{seed}:{i}"))
        scores.append(score(judge(render(scene)), scene.attrs))
    return accuracy(scores)
