"""The playground page (service/web) in headless Chromium against a real server with the tiny models: generate,
inpaint with a painted mask, cancel mid-run and a field error, each asserted on the page."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from sdserve import Client
from service.requests import Outcome
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.harness import TINY, ServerThread, requests_counted, running, serving, wait_ledger, wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/install_client_toolchains.sh installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[dev]'")

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def web(models_dir: Path) -> Iterator[ServerThread]:
    """A real server with its HTTP port; max_steps raised so a run can be long enough to cancel midway."""
    yield from running(models_dir, http_port=0, default_model=TINY, max_steps=1000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def opened(browser: Browser, srv: ServerThread, ready: bool = True) -> Iterator[Page]:
    """The page in a fresh browser context (its own localStorage); fails on any uncaught error in the page."""
    assert srv.server is not None
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://127.0.0.1:{srv.server.http_port}/")
    if ready:
        page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert errors == [], errors


@pytest.fixture()
def page(browser: Browser, web: ServerThread) -> Iterator[Page]:
    """The page, loaded, with the server's models listed."""
    with opened(browser, web) as page:
        yield page


def start(page: Page, button: str) -> str:
    """Clicks a run button; returns the selector of this run's status (the page numbers its runs)."""
    number = int(page.get_attribute("#status", "data-run") or "0") + 1
    page.click(f"#{button}")
    return f"#status[data-run='{number}']"


def run(page: Page, button: str, state: str = "done") -> None:
    """Clicks a run button and waits for that run's status to reach `state`."""
    page.wait_for_selector(f"{start(page, button)}[data-state={state}]")


def image_bytes(page: Page, selector: str) -> bytes:
    """The bytes behind an <img> on the page (a blob: or data: URL), as the page holds them."""
    b64: str = page.eval_on_selector(
        selector,
        """async (img) => {
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let s = "";
            for (const b of bytes) s += String.fromCharCode(b);
            return btoa(s);
        }""",
    )
    return base64.b64decode(b64)


def pixels(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode), dtype=np.int16)


def fill_form(page: Page, **fields: str) -> None:
    page.select_option("#model", TINY)
    for name, value in fields.items():
        page.fill(f"#{name.replace('_', '-')}", value)


def test_generate_shows_progress_image_seed_and_history(page: Page, web: ServerThread) -> None:
    options = page.locator("#model option")
    assert options.count() == 2 and "sd15" in (page.text_content(f"#model option[value='{TINY}']") or "")
    assert "generate, edit, inpaint" in (page.text_content("#model-info") or "")
    fill_form(page, prompt="a red circle", steps="4", width="64", height="64", seed="")
    run(page, "generate")

    bar = page.locator("#progress")
    assert bar.get_attribute("data-step") == bar.get_attribute("data-total") == "4"
    assert bar.evaluate("b => b.value === b.max")
    # Live previews: one per step (latent RGB, every step), shown while running and gone once the result is in.
    assert page.get_attribute("#preview", "data-shown") == "4" and page.is_hidden("#preview")
    result = page.locator("#results img.result-image")
    assert result.count() == 1
    result.evaluate("img => img.decode()")
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
    seed = page.text_content("#seed-used") or ""
    assert seed.isdigit() and result.get_attribute("data-seed") == seed
    history = page.locator("#history li.history-entry")
    assert history.count() == 1 and history.first.get_attribute("data-seed") == seed

    # The page's bytes are the server's: the same request from the Python client gives the same PNG.
    with Client(web.target) as client:
        same = client.generate("a red circle", model=TINY, steps=4, width=64, height=64, seed=int(seed))
    assert image_bytes(page, "#results img.result-image") == same.images[0].data

    # Reuse the seed, then recall the history entry after changing the form.
    page.click("#reuse-seed")
    assert page.input_value("#seed") == seed
    fill_form(page, prompt="something else", steps="9", seed="")
    history.first.locator("button[data-action=recall]").click()
    assert page.input_value("#prompt") == "a red circle"
    assert page.input_value("#steps") == "4" and page.input_value("#seed") == seed


def test_inpaint_repaints_only_the_painted_part(page: Page) -> None:
    fill_form(page, prompt="a red circle", steps="3", seed="5", width="", height="")
    run(page, "generate")
    source = image_bytes(page, "#results img.result-image")
    page.click("#use-last")
    page.wait_for_selector("#canvas-wrap[data-width='64'][data-height='64']")

    # Paint an L-shaped stroke in the lower right quarter with the mouse.
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    page.mouse.move(*at(0.6, 0.65))
    page.mouse.down()
    page.mouse.move(*at(0.9, 0.65), steps=6)
    page.mouse.move(*at(0.9, 0.9), steps=6)
    page.mouse.up()
    assert page.text_content("#mask-coverage") != "0% to repaint"

    fill_form(page, prompt="a blue square", steps="3", seed="9")
    run(page, "inpaint")

    # The mask the page sent: white (repaint) on the stroke, black elsewhere, the input's size.
    sent = page.locator("#last-mask")
    assert (sent.get_attribute("data-width"), sent.get_attribute("data-height")) == ("64", "64")
    mask = pixels(image_bytes(page, "#last-mask"), "L")
    assert mask.shape == (64, 64)
    white = mask >= 128
    for fx, fy in ((0.6, 0.65), (0.75, 0.65), (0.9, 0.65), (0.9, 0.8), (0.9, 0.9)):
        assert white[int(fy * 64), int(fx * 64)], (fx, fy)
    assert not white[:32, :].any() and not white[:, :32].any()
    assert abs(white.mean() - float(sent.get_attribute("data-share") or "0")) < 0.01

    # "Keep unmasked pixels exactly" is on: outside the mask the result is the input, byte for byte; inside it
    # is repainted. So the server read white exactly where the stroke is.
    result = page.locator("#results img.result-image")
    assert result.count() == 1
    after, before = pixels(image_bytes(page, "#results img.result-image")), pixels(source)
    assert (after[~white] == before[~white]).all()
    assert (after[white] != before[white]).any()

    entries = page.locator("#history li.history-entry")
    assert entries.count() == 2 and entries.first.get_attribute("data-task") == "inpaint"
    assert entries.first.locator("img[alt='mask sent']").count() == 1


def test_cancel_stops_the_run_on_the_server(page: Page, web: ServerThread) -> None:
    before = requests_counted(web, transport="connect", outcome="cancelled", rpc="Generate")
    fill_form(page, prompt="a long run", steps="500", seed="3", width="64", height="64")
    status = start(page, "generate")
    page.wait_for_selector(f"{status}[data-state=running]")
    page.wait_for_function("Number(document.getElementById('progress').dataset.step) >= 1")
    page.click("#cancel")
    page.wait_for_selector(f"{status}[data-state=cancelled]")
    assert page.text_content("#status") == "Cancelled"
    assert page.locator("#results img.result-image").count() == 0
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")

    request_id = page.get_attribute("#status", "data-request-id")
    assert request_id
    entry = wait_ledger(web, request_id)
    assert entry.outcome is Outcome.CANCELLED and entry.steps_done < 500 and not entry.decoded
    wait_until(
        lambda: requests_counted(web, transport="connect", outcome="cancelled", rpc="Generate") >= before + 1,
        "the cancelled call to be counted",
    )


def test_field_errors_show_next_to_their_fields(page: Page) -> None:
    fill_form(page, prompt="a red circle", width="7", height="100000", steps="2")
    run(page, "generate", state="error")
    width_error = page.locator(".field-error[data-field='params.width']")
    assert "multiple of 8" in (width_error.text_content() or "")
    assert "100000" in (page.text_content(".field-error[data-field='params.height']") or "")
    assert "invalid" in (page.get_attribute("#width", "class") or "")
    # The error sits beside the width input, in its own row, and nothing went to the general error line.
    assert page.locator(".row:has(#width) .field-error").text_content() == width_error.text_content()
    assert page.text_content("#error") == ""
    assert page.locator("#results img.result-image").count() == 0

    # Fixing the field clears the error on the next run.
    fill_form(page, width="64", height="64")
    run(page, "generate")
    assert width_error.text_content() == ""


def test_the_api_key_is_asked_for_sent_and_kept(browser: Browser, models_dir: Path) -> None:
    with (
        serving(models_dir, http_port=0, api_keys=("page-key",), default_model=TINY) as srv,
        opened(browser, srv, ready=False) as page,
    ):
        slot = page.locator(".field-error[data-field=api_key]")
        slot.filter(has_text="API key").wait_for()
        assert page.text_content("#server-info") == "not connected"
        page.fill("#api-key", "page-key")
        page.press("#api-key", "Enter")
        page.wait_for_selector("body[data-ready=true]")
        assert slot.text_content() == ""
        fill_form(page, prompt="a red circle", steps="2", seed="1")
        run(page, "generate")
        # Kept in localStorage: a reload connects with it at once.
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.input_value("#api-key") == "page-key"
