"""The committed playground bundle (service/web/assets) is what `npm run build:playground` makes from its sources."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TS_DIR = REPO / "clients" / "typescript"
WEB = REPO / "service" / "web"
HINT = "scripts/install_client_toolchains.sh installs them (npm ci in clients/typescript)"


def _tools() -> tuple[str, Path]:
    """node and the TypeScript compiler, or a skip naming what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not installed: {HINT}")
    tsc = TS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
    for needed in (tsc, TS_DIR / "node_modules" / "esbuild", TS_DIR / "node_modules" / "@connectrpc" / "connect-web"):
        if not needed.exists():
            pytest.skip(f"{needed.relative_to(REPO)} is missing: {HINT}")
    return node, tsc


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=TS_DIR, capture_output=True, text=True, timeout=300, check=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_committed_bundle_matches_its_sources(tmp_path: Path) -> None:
    node, tsc = _tools()
    checked = _run([node, str(tsc), "-p", "playground/tsconfig.json"])
    assert checked.returncode == 0, f"the playground does not type-check:\n{checked.stdout}{checked.stderr}"
    built = _run([node, "playground/build.mjs", "--out", str(tmp_path)])
    assert built.returncode == 0, built.stdout + built.stderr
    # The build makes the assets; service/web/index.html is the page's one source, written by hand.
    fresh, committed = _files(tmp_path / "assets"), _files(WEB / "assets")
    assert sorted(fresh) == sorted(committed), "service/web/assets holds other files than the build makes"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"service/web/assets/{', '.join(stale)} is stale: run `make web` and commit the result"


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, web font or other origin: the page works offline, and its own files are fetched relative to it."""
    elsewhere = re.compile(
        r"""(?:src|href)\s*=\s*["']?(?:[a-z]+:)?//|url\(\s*["']?(?:[a-z]+:)?//|@import|@font-face""", re.I
    )
    for name, data in _files(WEB).items():
        found = elsewhere.search(data.decode("utf-8"))
        assert found is None, f"service/web/{name} loads from elsewhere: {found.group(0) if found else ''}"
    page = (WEB / "index.html").read_text()
    assert 'src="assets/playground.js"' in page and 'href="assets/playground.css"' in page
