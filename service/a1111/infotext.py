"""A1111 infotext: read from an image's `parameters` text (or EXIF comment), parsed into fields as A1111's PNG-info
does, with sdserve's sampler names given in A1111's terms."""

from __future__ import annotations

import io
import json
import re
from typing import Any

from PIL import Image

from service.a1111 import samplers

# A "Key: value" item of the settings line; a value with commas is JSON-quoted (as A1111 writes it).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_CONTRACT_SAMPLER = re.compile(r"(^|, )Sampler: ([A-Z][A-Z0-9_]*)(?=,|$)")
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
# Pillow's image facts that are not text chunks (A1111 drops the same ones).
_NOT_ITEMS = {"dpi", "exif", "icc_profile", "gamma", "chromaticity", "transparency", "aspect", "srgb"}


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can open."""


def a1111_sampler_names(text: str) -> str:
    """`text` with a contract scheduler name in `Sampler: ...` (as sdserve writes it) replaced by A1111's sampler
    name, and `Schedule type: ...` added when the schedule is not the sampler's automatic one."""
    if not text:
        return text
    *head, last = text.split("\n")

    def rename(m: re.Match[str]) -> str:
        name, schedule = samplers.a1111_names(m.group(2))
        extra = f", Schedule type: {schedule}" if schedule != samplers.AUTOMATIC else ""
        return f"{m.group(1)}Sampler: {name}{extra}"

    return "\n".join([*head, _CONTRACT_SAMPLER.sub(rename, last)])


def read(data: bytes) -> tuple[str, dict[str, Any]]:
    """(infotext, the image's other text items) of an encoded image; raises NotAnImage."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # Pillow raises many types for bytes it cannot read.
        raise NotAnImage("is not an image this server can read (PNG, JPEG or WebP)") from None
    items = {k: v for k, v in img.info.items() if isinstance(k, str) and k not in _NOT_ITEMS}
    items = {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in items.items()}
    text = items.pop("parameters", None)
    if not isinstance(text, str):
        text = _exif_comment(img)
    return a1111_sampler_names(text), items


def _exif_comment(img: Image.Image) -> str:
    """The EXIF UserComment (where JPEG and WebP keep parameters), or ""."""
    try:
        raw = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # Malformed EXIF: no parameters to show.
        return ""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return ""
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        return body.decode("utf-16-be", "replace").strip("\x00")
    if prefix.startswith(b"ASCII") or prefix == bytes(8):
        return body.decode("utf-8", "replace").strip("\x00")
    return raw.decode("utf-8", "replace").strip("\x00")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except ValueError:
            return value
    return value


def parse(text: str) -> dict[str, Any]:
    """The infotext's fields, as A1111's parse_generation_parameters gives them: Prompt, Negative prompt, each
    `Key: value` of the settings line as a string (a `WxH` size as Key-1 and Key-2), and A1111's defaults for
    Clip skip and Schedule type."""
    lines = text.strip().split("\n")
    settings = lines[-1] if len(_PARAM.findall(lines[-1])) >= 3 else ""
    if settings:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            prompt.append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw in _PARAM.findall(settings):
        value = _unquote(raw.strip())
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    out.setdefault("Clip skip", "1")
    out.setdefault("Schedule type", samplers.AUTOMATIC)
    return out
