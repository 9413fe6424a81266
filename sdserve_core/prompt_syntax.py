"""AUTOMATIC1111 / SD.Next prompt syntax, parsed without torch: `<lora:NAME:SCALE>` tags and attention weights.

`parse_attention` is A1111's `modules/prompt_parser.py::parse_prompt_attention`, rule for rule (same regular
expression, same bracket stack, same merging of equal weights, BREAK returned as ("BREAK", -1)); the only
difference is that a weight the expression accepts but Python cannot read (`(a:1.2.3)`) raises PromptSyntaxError
where A1111 raises a bare ValueError. docs/prompts.md describes the grammar.
"""

from __future__ import annotations

import math
import re

__all__ = ["BREAK", "PromptSyntaxError", "extract_loras", "is_plain", "parse_attention"]

# The fragment parse_attention returns for a BREAK keyword (A1111's marker: text "BREAK", weight -1).
BREAK = ("BREAK", -1.0)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# A1111's re_attention, alternative for alternative (current master: spaces allowed around a weight).
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA = re.compile(r"<lora:([^>]*)>")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class PromptSyntaxError(ValueError):
    """A prompt that breaks one of the syntax's rules; the message names the offending text and the rule."""


def extract_loras(text: str) -> tuple[str, list[tuple[str, float | None]]]:
    """The text without its `<lora:NAME>` / `<lora:NAME:SCALE>` tags (removed as A1111 removes them: nothing
    else changes), and (NAME, SCALE or None) for each tag in order. NAME is anything but `:` and `>`; SCALE is a
    decimal number. PromptSyntaxError for a malformed tag."""
    found: list[tuple[str, float | None]] = []

    def take(match: re.Match[str]) -> str:
        found.append(_lora_tag(match.group(0), match.group(1)))
        return ""

    return _LORA.sub(take, text), found


def _lora_tag(tag: str, body: str) -> tuple[str, float | None]:
    parts = body.split(":")
    if len(parts) > 2:
        raise PromptSyntaxError(f"malformed LoRA tag {tag!r}: write <lora:NAME> or <lora:NAME:SCALE>")
    name = parts[0].strip()
    if not name:
        raise PromptSyntaxError(f"malformed LoRA tag {tag!r}: the name is empty (write <lora:NAME:SCALE>)")
    if len(parts) == 1:
        return name, None
    scale = parts[1].strip()
    if not _NUMBER.fullmatch(scale) or not math.isfinite(float(scale)):
        raise PromptSyntaxError(f"malformed LoRA tag {tag!r}: the scale {scale!r} is not a number (e.g. 0.8)")
    return name, float(scale)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) fragments of a prompt, as A1111's parse_prompt_attention: `(x)` multiplies x's weight by
    1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal
    characters; brackets still open at the end are closed there; neighbours of equal weight are merged; a BREAK
    keyword outside brackets is the fragment ("BREAK", -1)."""
    res: list[list[str | float]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] = float(res[p][1]) * multiplier

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), _weight(weight, piece))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)
    return _merged(res)


def _weight(number: str, piece: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptSyntaxError(f"bad attention weight {piece!r}: write (text:1.3)") from None


def _merged(res: list[list[str | float]]) -> list[tuple[str, float]]:
    """A1111's last step: an empty parse is one empty fragment, and runs of equal weights become one fragment."""
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] = str(res[i][0]) + str(res[i + 1][0])
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def is_plain(text: str) -> bool:
    """Whether `text` uses none of the syntax: it parses to itself, one fragment of weight 1.0 (no brackets, no
    escapes, no BREAK)."""
    return parse_attention(text) == [(text, 1.0)]
