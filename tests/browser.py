"""Debian's Chromium as a headless test browser: its path and the flags it runs with (the browser tests and
scripts/readme_playground_images.py share them)."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# No GPU, no sandbox (containers), and nothing that talks to the network on its own (the machine's closed network
# refuses those connections, many at a time).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
