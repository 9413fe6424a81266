"""Base64 images in and out of the A1111 edge, and A1111's resize modes for img2img inputs."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from service import imaging
from service.settings import Settings

MAX_UINT32 = 0xFFFFFFFF


class BadImage(ValueError):
    """A base64 image field that cannot be read; the message states the rule."""


def decode_b64(text: str) -> bytes:
    """The bytes of a base64 image, with or without a `data:image/...;base64,` prefix (as A1111 accepts)."""
    value = text.strip()
    if value.startswith(("http://", "https://")):
        raise BadImage("is a URL; this server does not fetch images: send the image as base64 (a data: URL is fine)")
    if value.startswith("data:"):
        head, comma, value = value.partition(",")
        if not comma or not head.endswith(";base64"):
            raise BadImage("is a data: URL without base64 data")
    value = "".join(value.split())
    value += "=" * (-len(value) % 4)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("is not valid base64") from None
    if not data:
        raise BadImage("is empty")
    return data


def encode_b64(data: bytes) -> str:
    """Base64 text without a prefix, as A1111 returns images."""
    return base64.b64encode(data).decode("ascii")


def fitted(data: bytes, size: tuple[int, int], mode: int, settings: Settings, colour: str) -> bytes:
    """`data` unchanged when the image already is `size` (width, height); else the image resized to it the way
    A1111's `resize_mode` does (0 just resize, 1 crop and resize, 2 resize and fill), as PNG. `colour` is `RGB` for
    images, `L` for masks. Decoding applies the server's limits; a broken image raises BadImage."""
    img = _decode(data, settings, colour)
    if img.size == size:
        return data
    if mode == 1:
        out = _crop_and_resize(img, size)
    elif mode == 2:
        out = _resize_and_fill(img, size)
    else:
        out = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def upright_size(data: bytes, settings: Settings) -> tuple[int, int]:
    """The size of an image as shown (EXIF orientation applied); raises BadImage."""
    return _decode(data, settings, "RGB").size


def _decode(data: bytes, settings: Settings, colour: str) -> Image.Image:
    """The image, decoded under the server's limits (the servicer's own decoder); raises BadImage."""
    try:
        return imaging.decode_image(
            data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_input_pixels, mode=colour
        )
    except imaging.ImageDecodeError as exc:
        raise BadImage(str(exc)) from None


def _crop_and_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scaled to cover `size`, then the centre cut out."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    scaled = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


def _resize_and_fill(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scaled to fit inside `size` and centred; the bands left over repeat the image's edge rows or columns."""
    width, height = size
    scale = min(width / img.width, height / img.height)
    inner = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    scaled = img.resize(inner, Image.Resampling.LANCZOS)
    out = Image.new(img.mode, size)
    left, top = (width - inner[0]) // 2, (height - inner[1]) // 2
    out.paste(scaled, (left, top))
    if top > 0:
        out.paste(scaled.crop((0, 0, inner[0], 1)).resize((inner[0], top)), (left, 0))
        bottom = height - top - inner[1]
        if bottom > 0:
            edge = scaled.crop((0, inner[1] - 1, inner[0], inner[1])).resize((inner[0], bottom))
            out.paste(edge, (left, top + inner[1]))
    if left > 0:
        out.paste(scaled.crop((0, 0, 1, inner[1])).resize((left, inner[1])), (0, top))
        right = width - left - inner[0]
        if right > 0:
            edge = scaled.crop((inner[0] - 1, 0, inner[0], inner[1])).resize((right, inner[1]))
            out.paste(edge, (left + inner[0], top))
    return out
