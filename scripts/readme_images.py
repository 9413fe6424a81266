"""Writes docs/images/shapes-demo.png: generate, edit and inpaint results of the embedded model, through a
live server (python -m scripts.readme_images; starts its own server)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from quality.server import running_server
from sdserve import Client

PROMPTS = [
    "a large red circle in the centre on a blue background",
    "a small yellow square on a black background",
    "a large white triangle on a purple background",
    "a green circle on a white background",
    "a large orange square on a green background",
    "a blue triangle on a yellow background",
]
SCALE = 3


def _img(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(out: Path) -> None:
    with running_server() as target, Client(target) as c:
        tiles = [_img(c.generate(p, seed=i, steps=20).image.data) for i, p in enumerate(PROMPTS)]
        source = tiles[0]
        edited = _img(
            c.edit(
                _png(source), "a large yellow circle in the centre on a blue background", strength=0.7, seed=2, steps=20
            ).image.data
        )
        mask = Image.new("L", source.size, 0)
        # The centre square of the image (where the first prompt put its shape), repainted in another colour.
        q = source.width // 6
        ImageDraw.Draw(mask).rectangle([q, q, source.width - q - 1, source.height - q - 1], fill=255)
        painted = _img(
            c.inpaint(
                _png(source),
                _png(mask),
                "a large green circle in the centre on a blue background",
                seed=3,
                steps=20,
                preserve_unmasked=True,
            ).image.data
        )
    row = [*tiles, source, edited, painted]
    w, h = source.width * SCALE, source.height * SCALE
    sheet = Image.new("RGB", (len(row) * (w + 4) - 4, h), "white")
    for i, tile in enumerate(row):
        sheet.paste(tile.resize((w, h), Image.Resampling.NEAREST), (i * (w + 4), 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/shapes-demo.png"))
