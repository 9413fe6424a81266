"""Image decoding with limits, encoding with embedded parameters, and mask handling."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageFilter, PngImagePlugin

_FORMATS = {"PNG", "JPEG", "WEBP"}
# EXIF UserComment starts with an 8-byte character code; ASCII is safe because the JSON is ASCII-escaped.
_EXIF_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message states the rule."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, mode: str) -> Image.Image:
    """Decodes PNG/JPEG/WebP bytes into a fully loaded image in `mode`, enforcing size limits first."""
    if not data:
        raise ImageDecodeError("is required")
    if len(data) > max_bytes:
        raise ImageDecodeError(f"is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in _FORMATS:
                raise ImageDecodeError(f"must be PNG, JPEG or WebP, not {img.format}")
            # The header gives the size before any pixel is decoded: refuse bombs here.
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"is {img.width}x{img.height} = {img.width * img.height} pixels; the limit is {max_pixels} pixels"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"has more pixels than the limit of {max_pixels} pixels") from None
    except Exception as exc:  # Pillow raises many types for corrupt data.
        raise ImageDecodeError("is not a decodable PNG, JPEG or WebP image") from exc
    return img.convert(mode)


def encode_image(
    img: Image.Image, fmt: str, quality: int, parameters: Mapping[str, object] | None = None, a1111: str = ""
) -> bytes:
    """Encodes `img` as png/jpeg/webp, optionally embedding the parameters as metadata."""
    buf = io.BytesIO()
    if fmt == "png":
        info = None
        if parameters is not None:
            info = PngImagePlugin.PngInfo()
            if a1111:
                info.add_itxt("parameters", a1111)
            info.add_itxt("sdserve", json.dumps(parameters, sort_keys=True))
        # compress_level 4: the encoder is a visible share of latency for small images at level 9.
        img.save(buf, format="PNG", pnginfo=info, compress_level=4)
    elif fmt in ("jpeg", "webp"):
        kwargs: dict[str, object] = {"quality": quality}
        if fmt == "webp" and quality >= 100:
            kwargs = {"lossless": True}
        if parameters is not None:
            exif = Image.Exif()
            comment = b"ASCII\x00\x00\x00" + json.dumps(parameters, sort_keys=True).encode("ascii")
            exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = comment
            kwargs["exif"] = exif.tobytes()
        img.save(buf, format=fmt.upper(), **kwargs)
    else:
        raise ValueError(f"unknown format {fmt}")
    return buf.getvalue()


def read_parameters(data: bytes) -> dict[str, object] | None:
    """Reads back the JSON parameters embedded by encode_image, or None."""
    img = Image.open(io.BytesIO(data))
    if img.format == "PNG":
        text = img.info.get("sdserve")
        return None if text is None else dict(json.loads(text))
    raw = img.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if not raw:
        return None
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    return dict(json.loads(bytes(raw)[8:].decode("ascii")))


def binary_mask(mask: Image.Image, invert: bool) -> Image.Image:
    """Greyscale mask to 0/255 (128 and above is white), inverted when asked."""
    arr = np.asarray(mask.convert("L")) >= 128
    if invert:
        arr = ~arr
    return Image.fromarray((arr * 255).astype(np.uint8), mode="L")


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur of a mask's edge; radius 0 returns it unchanged."""
    return mask if radius <= 0 else mask.filter(ImageFilter.GaussianBlur(radius))


def composite_unmasked(
    original: Image.Image, generated: Image.Image, hard: Image.Image, soft: Image.Image
) -> Image.Image:
    """Keeps `original` byte-exact outside `hard`; inside, blends `generated` in with alpha `soft`."""
    orig = np.asarray(original.convert("RGB"), dtype=np.float32)
    gen = np.asarray(generated.convert("RGB").resize(original.size, Image.Resampling.LANCZOS), dtype=np.float32)
    inside = np.asarray(hard, dtype=np.uint8) >= 128
    alpha = np.asarray(soft, dtype=np.float32)[..., None] / 255.0
    blended = np.clip(np.rint(gen * alpha + orig * (1.0 - alpha)), 0, 255)
    out = np.where(inside[..., None], blended, orig).astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


def fit_edge(img: Image.Image, max_edge: int) -> Image.Image:
    """Scales `img` so its longest edge is `max_edge` pixels."""
    w, h = img.size
    scale = max_edge / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == img.size:
        return img
    resample = Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX
    return img.resize(size, resample)
