"""The shapes prompt language: vocabulary, attributes, prompt text and its parser."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
# Colours the base model does not know, taught by the adapters (issue 23). The shipped VAE only ever saw the 8
# base colours; these three are the ones it reproduces best of 14 tried (a scene's shape or background, encoded
# and decoded, keeps maroon in 79%, cream in 92% and teal in 85% of a held-out grid's scenes; grey in 63%, and
# pink, cyan, navy, lime, magenta, sky, olive, brown, salmon and dark green in at most 35%), each more than 90
# units from every base colour. Its encoder is what loses them (a flat teal field decodes green, a flat cream one
# near white); a latent found by decoder inversion draws each of them (adapters.INVERT_STEPS), and the palette
# stage (palette.py) then fine-tuned the family's decoder to draw them from near such latents too. Textual inversion
# was tried for "maroon" and "teal" (TI_CANDIDATES); the better one, TI_COLOUR, is the embedding
# `shapes-<colour>` (prompt word TI_TOKEN) and the LoRA `shapes-<colour>-<colour>` teaches the other two
# (LORA_COLOURS). The base language, its training data and the default scorer use COLOURS only.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "maroon": (128, 0, 0),
    "cream": (255, 255, 128),
    "teal": (64, 128, 128),
}
TI_CANDIDATES = ("maroon", "teal")
TI_COLOUR = "maroon"
TI_TOKEN = f"<{TI_COLOUR}>"
LORA_COLOURS: dict[str, tuple[int, int, int]] = {c: v for c, v in NEW_COLOURS.items() if c != TI_COLOUR}
ADAPTER_COLOURS: dict[str, tuple[int, int, int]] = {**LORA_COLOURS, TI_COLOUR: NEW_COLOURS[TI_COLOUR]}
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **ADAPTER_COLOURS}
# The prompt word of each colour that is not its name.
PROMPT_WORDS: dict[str, str] = {TI_COLOUR: TI_TOKEN}
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


def prompt_text(a: Attributes, words: Mapping[str, str] | None = None) -> str:
    """Render attributes as a prompt in the shapes language; words maps colour names to other prompt words
    (PROMPT_WORDS for the adapters' colours)."""
    words = words or {}
    parts = ["a"]
    if a.size:
        parts.append(a.size)
    parts += [words.get(a.colour, a.colour), a.shape]
    if a.position:
        parts.append(POSITIONS[a.position])
    parts.append(f"on a {words.get(a.background, a.background)} background")
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
