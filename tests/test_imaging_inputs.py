"""Input images of every mode Pillow decodes (16-bit, palette, alpha, CMYK, EXIF-rotated) arrive as the pixels shown."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdserve import Client, SdserveError
from service.imaging import ImageDecodeError, decode_image, eight_bit
from tests.harness import pixels, png, sample_image

LIMITS = {"max_bytes": 1 << 24, "max_pixels": 4096 * 4096}
ORIENTATION = 0x0112


def decode(data: bytes, mode: str) -> np.ndarray:
    return np.asarray(decode_image(data, mode=mode, **LIMITS), dtype=np.int16)


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def raw_png(
    samples: np.ndarray, color_type: int, *, depth: int = 16, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """A PNG written by hand, not by Pillow's encoder: `samples` is (h, w, channels) at `depth` bits."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = samples.shape[:2]
    dtype = ">u2" if depth == 16 else "u1"
    rows = b"".join(b"\x00" + samples[y].astype(dtype).tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    body = b"".join(chunk(kind, data) for kind, data in extra)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def grey16(levels: list[int], width: int = 4) -> np.ndarray:
    """One row per level, `width` pixels each."""
    return np.repeat(np.array(levels, dtype=np.uint16)[:, None], width, axis=1)


# ---- high bit depth ---------------------------------------------------------------------------------------------

LEVELS = [0, 257, 16384, 32640, 32768, 49152, 65535]
EXPECTED = [0, 1, 64, 127, 128, 191, 255]


@pytest.mark.parametrize("source", ["pillow", "raw"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_sixteen_bit_grey_png_is_scaled_not_clipped(source: str, mode: str) -> None:
    arr = grey16(LEVELS)
    data = png(Image.fromarray(arr)) if source == "pillow" else raw_png(arr[..., None], color_type=0)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data, mode)
    rows = out if mode == "L" else out[..., 1]
    assert rows[:, 0].tolist() == EXPECTED
    assert abs(int(decode(raw_png(grey16([32768])[..., None], 0), mode).mean()) - 128) <= 1


def test_big_endian_sixteen_bit_grey_is_scaled() -> None:
    img = Image.frombytes("I;16B", (4, len(LEVELS)), grey16(LEVELS).astype(">u2").tobytes())
    assert decode(png(img), "L")[:, 0].tolist() == EXPECTED


def test_sixteen_bit_grey_transparent_level_becomes_the_background() -> None:
    arr = grey16([32768, 1000])
    data = raw_png(arr[..., None], color_type=0, extra=((b"tRNS", struct.pack(">H", 1000)),))
    assert decode(data, "L")[:, 0].tolist() == [128, 0]
    assert decode(data, "RGB")[:, 0].tolist() == [[128] * 3, [255] * 3]


def test_sixteen_bit_rgb_and_rgba_png() -> None:
    rgb = np.zeros((2, 4, 3), dtype=np.uint16)
    rgb[...] = (65535, 32768, 0)
    assert decode(raw_png(rgb, color_type=2), "RGB")[0, 0].tolist() == [255, 128, 0]
    rgba = np.zeros((2, 4, 4), dtype=np.uint16)
    rgba[...] = (0, 0, 0, 32768)  # half-transparent black
    assert abs(decode(raw_png(rgba, color_type=6), "RGB")[0, 0] - 128).max() <= 1  # on white
    assert abs(decode(raw_png(rgba, color_type=6), "L")[0, 0]) <= 0  # on black


def test_sixteen_bit_grey_with_alpha() -> None:
    la = np.zeros((2, 4, 2), dtype=np.uint16)
    la[0] = (65535, 65535)
    la[1] = (65535, 0)
    assert decode(raw_png(la, color_type=4), "L")[:, 0].tolist() == [255, 0]


def test_int_and_float_modes_without_an_encoding() -> None:
    """No accepted format decodes to 32-bit `I` or float `F`; their scale is fixed here for completeness."""
    wide = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(eight_bit(wide)).tolist() == [[0, 128, 255, 255, 0]]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(eight_bit(floats)).tolist() == [[0, 128, 255, 255, 0, 0]]
    rgb = Image.new("RGB", (2, 2))
    assert eight_bit(rgb) is rgb


# ---- palette and alpha ------------------------------------------------------------------------------------------


def palette_image(transparent: bool) -> bytes:
    img = Image.new("P", (4, 2), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def test_palette_png() -> None:
    out = decode(palette_image(False), "RGB")
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[1, 1].tolist() == [200, 100, 50]


def test_palette_png_with_transparency() -> None:
    data = palette_image(True)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode(data, "RGB")
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent entry, on white
    assert out[1, 1].tolist() == [200, 100, 50]
    mask = decode(data, "L")
    assert mask[0, 0] == 0  # a transparent mask pixel keeps
    assert mask[1, 1] == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


def test_rgba_image_is_composited_on_white() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0] = (0, 0, 0, 0)
    arr[1] = (0, 0, 0, 255)
    arr[:, 2] = (200, 0, 0, 128)
    out = decode(png(Image.fromarray(arr)), "RGB")
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [0, 0, 0]
    assert abs(out[0, 2] - [228, 127, 127]).max() <= 1


def test_alpha_mask_transparent_means_keep() -> None:
    """White hiding under transparency does not repaint: a mask's alpha scales its grey level."""
    arr = np.zeros((1, 3, 2), dtype=np.uint8)
    arr[0] = [(255, 0), (255, 255), (255, 128)]
    assert decode(png(Image.fromarray(arr, mode="LA")), "L")[0].tolist() == [0, 255, 128]
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0] = [(255, 255, 255, 0), (255, 255, 255, 255)]
    assert decode(png(Image.fromarray(rgba)), "L")[0].tolist() == [0, 255]
    assert decode(encode(Image.fromarray(rgba), "WEBP", lossless=True), "L")[0].tolist() == [0, 255]


def test_rgb_png_with_a_transparent_colour() -> None:
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (9, 9, 9))
    out = decode(encode(img, "PNG", transparency=(1, 2, 3)), "RGB")
    assert out[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_one_bit_png() -> None:
    img = Image.new("1", (8, 1), 0)
    img.putpixel((3, 0), 1)
    assert decode(png(img), "L")[0].tolist() == [0, 0, 0, 255, 0, 0, 0, 0]


# ---- CMYK -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 0, 0, 0), (255, 255, 255)), ((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_jpeg(cmyk: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert abs(decode(data, "RGB")[8, 8] - rgb).max() <= 4


# ---- EXIF orientation ---------------------------------------------------------------------------------------------


def halves(width: int = 32, height: int = 16) -> Image.Image:
    """Left half red, right half blue, as stored."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def with_orientation(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    kwargs: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    return encode(img, fmt, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    # Where the stored left (red) half is shown, and the shown size (width, height) of a 32x16 image.
    ("orientation", "red_at", "size"),
    [(1, "left", (32, 16)), (3, "right", (32, 16)), (6, "top", (16, 32)), (8, "bottom", (16, 32))],
)
def test_exif_orientation_is_applied(fmt: str, orientation: int, red_at: str, size: tuple[int, int]) -> None:
    img = decode_image(with_orientation(halves(), fmt, orientation), mode="RGB", **LIMITS)
    assert img.size == size
    arr = np.asarray(img, dtype=np.int16)
    w, h = size
    probe = {"left": (h // 2, 2), "right": (h // 2, w - 3), "top": (2, w // 2), "bottom": (h - 3, w // 2)}[red_at]
    assert abs(arr[probe] - (255, 0, 0)).max() <= 8
    assert img.getexif().get(ORIENTATION) in (None, 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_malformed_exif_does_not_refuse_the_image(fmt: str) -> None:
    data = encode(halves(), fmt, exif=b"Exif\x00\x00garbage")
    assert decode_image(data, mode="RGB", **LIMITS).size == (32, 16)


def test_broken_bytes_are_still_refused() -> None:
    data = png(sample_image())
    for bad in (data[: len(data) // 2], b"garbage", raw_png(grey16([1]), 0)[:40]):
        with pytest.raises(ImageDecodeError, match="decodable"):
            decode_image(bad, mode="RGB", **LIMITS)


# ---- through the server -------------------------------------------------------------------------------------------


def test_sixteen_bit_mask_mid_grey_through_inpaint(client: Client) -> None:
    """Left half 32640 (127/255: keep), right half 32768 (128/255: repaint), as the contract's 128 threshold says."""
    levels = np.full((64, 64), 32640, dtype=np.uint16)
    levels[:, 32:] = 32768
    mask = png(Image.fromarray(levels))
    image = sample_image()
    r = client.inpaint(png(image), mask, "red", steps=3, seed=2, preserve_unmasked=True)
    out = pixels(r.image.data)
    src = np.asarray(image, dtype=np.int16)
    assert (out[:, :32] == src[:, :32]).all()
    assert (out[:, 32:] != src[:, 32:]).any()


def test_sixteen_bit_dark_mask_has_nothing_to_repaint(client: Client) -> None:
    dark = png(Image.fromarray(np.full((64, 64), 16384, dtype=np.uint16)))
    with pytest.raises(SdserveError) as info:
        client.inpaint(png(sample_image()), dark, "red", steps=2)
    assert info.value.code == "INVALID_ARGUMENT"
    assert "nothing to repaint" in {v.field: v.description for v in info.value.violations}["mask"]


def test_exif_rotated_edit_is_sized_after_rotation(client: Client) -> None:
    """Stored 64x40 with orientation 6: shown, and edited, as 40x64 (width=40 must match the rotated image)."""
    data = with_orientation(halves(64, 40), "JPEG", 6)
    r = client.edit(data, "x", width=40, height=64, steps=2, strength=0.5, seed=1)
    assert (r.image.width, r.image.height) == (40, 64)
