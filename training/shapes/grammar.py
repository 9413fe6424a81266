"""The shapes prompt language: vocabulary, attributes, prompt text and its parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 35),
    "purple": (140, 45, 180),
    "orange": (245, 140, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS: dict[str, str] = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Grid cell (column, row) of the image thirds in which each position puts the shape's centre.
POSITION_CELLS: dict[str, tuple[int, int]] = {
    "centre": (1, 1),
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
}
GRAMMAR = "a [small|large] <colour> <shape> [" + "|".join(POSITIONS.values()) + "] on a <colour> background"
WORDS = sorted(
    {"a", "on", "background", *COLOURS, *SHAPES, *SIZES} | {w for phrase in POSITIONS.values() for w in phrase.split()}
)


@dataclass(frozen=True)
class Attributes:
    """What a prompt asks for; size and position are None when the prompt leaves them open."""

    shape: str
    colour: str
    background: str
    size: str | None = None
    position: str | None = None


def prompt_text(a: Attributes) -> str:
    """Render attributes as a prompt in the shapes language."""
    parts = ["a"]
    if a.size:
        parts.append(a.size)
    parts += [a.colour, a.shape]
    if a.position:
        parts.append(POSITIONS[a.position])
    parts.append(f"on a {a.background} background")
    return " ".join(parts)


_ALT = "|".join
_PROMPT_RE = re.compile(
    rf"^a (?:(?P<size>{_ALT(SIZES)}) )?(?P<colour>{_ALT(COLOURS)}) (?P<shape>{_ALT(SHAPES)})"
    rf"(?: (?P<position>{_ALT(POSITIONS.values())}))? on a (?P<background>{_ALT(COLOURS)}) background$"
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITIONS.items()}


def parse_prompt(text: str) -> Attributes | None:
    """Parse a prompt of the shapes language; None if it is not one."""
    m = _PROMPT_RE.match(" ".join(text.lower().split()))
    if m is None or m["colour"] == m["background"]:
        return None
    pos = m["position"]
    return Attributes(
        shape=m["shape"],
        colour=m["colour"],
        background=m["background"],
        size=m["size"],
        position=_PHRASE_TO_POSITION[pos] if pos else None,
    )
