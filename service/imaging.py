"""Image decoding with limits, encoding with embedded parameters, and mask handling."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

_FORMATS = {"PNG", "JPEG", "WEBP"}
# Pillow reads 16-bit greyscale PNG as I;16 (older releases: I), values 0 to 65535.
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# EXIF UserComment starts with an 8-byte character code; ASCII is safe because the JSON is ASCII-escaped.
_EXIF_USER_COMMENT = 0x9286
_EXIF_IFD = 0x8769


class ImageDecodeError(ValueError):
    """The bytes are not an acceptable image; the message states the rule."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, mode: str) -> Image.Image:
    """Decodes PNG/JPEG/WebP bytes into a fully loaded image in `mode`, enforcing size limits first.

    The pixels come back in display orientation (EXIF orientation applied, so callers check the rotated size),
    8 bits per channel (16-bit greyscale is scaled, not clipped), and opaque: transparency is composited onto
    white for colour images, as editors show a transparent canvas, and onto black for greyscale `L`, which is
    how masks are read: a transparent mask pixel means "keep", whatever colour hides under it.
    """
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
            upright = _upright(img)
            return flatten(upright, mode, 0 if mode == "L" else 255)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError(f"has more pixels than the limit of {max_pixels} pixels") from None
    except Exception as exc:  # Pillow raises many types for corrupt data.
        raise ImageDecodeError("is not a decodable PNG, JPEG or WebP image") from exc


def _upright(img: Image.Image) -> Image.Image:
    """`img` rotated/mirrored as its EXIF orientation says; unchanged when the EXIF data is absent or unreadable."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # Malformed EXIF must not refuse pixels that decoded fine; showing them as stored is safe.
        return img


def eight_bit(img: Image.Image) -> Image.Image:
    """High-bit-depth greyscale as 8-bit: `I;16*` and `I` (PNG's 16-bit range) scaled by 255/65535, `F` read as
    0 to 1; a PNG transparent grey level becomes alpha (`LA`). Other modes come back unchanged."""
    if img.mode in _SIXTEEN_BIT:
        wide = np.asarray(img).astype(np.float64)
        grey = np.rint(np.clip(wide, 0, 65535) * (255 / 65535))
    elif img.mode == "F":
        wide = np.asarray(img).astype(np.float64)
        grey = np.rint(np.clip(np.nan_to_num(wide, nan=0.0), 0.0, 1.0) * 255)
    else:
        return img
    out = Image.fromarray(grey.astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, int):
        alpha = Image.fromarray(((wide != key) * 255).astype(np.uint8))
        out = Image.merge("LA", (out, alpha))
    return out


def flatten(img: Image.Image, mode: str, background: int) -> Image.Image:
    """`img` in `mode` (`RGB` or `L`), 8-bit, with any alpha or transparent colour composited onto grey `background`."""
    img = eight_bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = np.rint(rgba[..., :3] * alpha + float(background) * (1.0 - alpha)).astype(np.uint8)
        img = Image.fromarray(rgb)
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
