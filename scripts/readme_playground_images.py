"""Writes docs/images/playground.png and docs/images/playground-inpaint.png: the playground page (service/web) in
headless Chromium, driving the embedded shapes model through a live server (python -m scripts.readme_playground_images
[OUT_DIR]; starts its own server; needs /usr/bin/chromium and playwright, as tests/test_playground.py does)."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, ViewportSize, sync_playwright

from quality.server import running_server
from tests.browser import CHROMIUM, CHROMIUM_ARGS

VIEWPORT: ViewportSize = {"width": 1180, "height": 700}  # full-page shots: as tall as the page
MODEL = "shapes"
STEPS = "20"


def _generate(page: Page, prompt: str, seed: str) -> None:
    page.select_option("#model", MODEL)
    page.fill("#prompt", prompt)
    page.fill("#steps", STEPS)
    page.fill("#seed", seed)
    _run(page, "generate")


def _run(page: Page, button: str) -> None:
    number = int(page.get_attribute("#status", "data-run") or "0") + 1
    page.click(f"#{button}")
    page.wait_for_selector(f"#status[data-run='{number}'][data-state=done]", timeout=300_000)


def _paint_centre(page: Page) -> None:
    """Paints a disc over the centre of the input image (where the prompt put its shape), row by row."""
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    cx, cy, r = box["x"] + box["width"] * 0.49, box["y"] + box["height"] * 0.52, box["width"] * 0.34
    rows = 7
    page.mouse.move(cx, cy - r)
    page.mouse.down()
    for i in range(rows + 1):
        dy = -r + 2 * r * i / rows
        half = (r * r - dy * dy) ** 0.5
        page.mouse.move(cx - half if i % 2 else cx + half, cy + dy, steps=8)
    page.mouse.up()


def _save(png: bytes, out: Path) -> None:
    """Stores the screenshot as a palette PNG (flat UI colours plus small images: a few hundred KB at most)."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "http-port"
        with running_server("--http-port", "0", "--http-port-file", str(port_file)), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT, color_scheme="light")
            page.goto(f"http://127.0.0.1:{port_file.read_text()}/")
            page.wait_for_selector("body[data-ready=true]")

            _generate(page, "a small yellow square on a black background", "11")
            _generate(page, "a large red circle in the centre on a blue background", "7")
            page.screenshot(path=str(Path(tmp) / "generate.png"), full_page=True)
            _save((Path(tmp) / "generate.png").read_bytes(), out / "playground.png")

            page.click("#use-last")
            page.wait_for_selector("#canvas-wrap:not([hidden])")
            page.fill("#brush", "12")
            page.dispatch_event("#brush", "input")
            _paint_centre(page)
            page.fill("#prompt", "a large green circle in the centre on a blue background")
            page.fill("#seed", "3")
            _run(page, "inpaint")
            page.screenshot(path=str(Path(tmp) / "inpaint.png"), full_page=True)
            _save((Path(tmp) / "inpaint.png").read_bytes(), out / "playground-inpaint.png")
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images"))
