"""Writes docs/images/shapes-adapters.png: the embedded shapes model through a live server, the same prompts and
seeds three ways per column pair: without adapters, with the shipped LoRA (its new colour words), and with the
shipped embedding's token (python -m scripts.readme_adapter_images; starts its own server)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from quality.server import running_server
from sdserve import Client
from training.shapes.adapters import LORA_NAME
from training.shapes.grammar import LORA_COLOURS, TI_TOKEN

SCALE = 3


def prompts() -> list[tuple[str, list[tuple[str, float]]]]:
    """(prompt, adapters) of each tile: the LoRA's two words as shape colour and background, then the token."""
    first, second = list(LORA_COLOURS)
    return [
        (f"a large {first} circle on a white background", [(LORA_NAME, 1.0)]),
        (f"a {second} square on a black background", [(LORA_NAME, 1.0)]),
        (f"a large red triangle on a {first} background", [(LORA_NAME, 1.0)]),
        (f"a yellow circle on a {second} background", [(LORA_NAME, 1.0)]),
        (f"a large {TI_TOKEN} square on a white background", []),
        (f"a {TI_TOKEN} circle on a yellow background", []),
    ]


def main(out: Path) -> None:
    tiles = []
    with running_server() as target, Client(target) as c:
        for i, (prompt, adapters) in enumerate(prompts()):
            data = c.generate(prompt, seed=i, steps=20, adapters=adapters).image.data
            tiles.append(Image.open(io.BytesIO(data)).convert("RGB"))
    w, h = tiles[0].width * SCALE, tiles[0].height * SCALE
    sheet = Image.new("RGB", (len(tiles) * (w + 4) - 4, h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((w, h), Image.Resampling.NEAREST), (i * (w + 4), 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/shapes-adapters.png"))
