"""Adapters through a real server: an unknown adapter is NOT_FOUND naming its field from the sync and async
clients and the CLI, GetServerInfo's limit, and the shipped shapes LoRA (models/adapters/LORA_NAME) applied
with `sdserve generate --lora` and reported back as the served identity."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import AsyncClient, Client, ResolvedAdapter, Result, SdserveError, Started
from service.settings import REPO_ROOT
from tests.harness import ServerThread, pixels, serving
from tests.test_cli import run_cli
from training.shapes.adapters import LORA_NAME
from training.shapes.grammar import LORA_COLOURS

MODELS = REPO_ROOT / "models"
SHAPES_LORA = MODELS / "adapters" / LORA_NAME
MISSING = "no-such-adapter"
FIELD = "params.adapters[0].name"
PROMPT = f"a {next(iter(LORA_COLOURS))} circle on a white background"


def _names_field(err: SdserveError, field: str) -> bool:
    """Whether the error names `field`, as a field violation or in its message."""
    return any(v.field == field for v in err.violations) or field in err.message


def test_unknown_adapter_is_not_found(client: Client) -> None:
    with pytest.raises(SdserveError) as info:
        client.generate("a red circle", adapters=[MISSING], steps=2, seed=1)
    assert info.value.code == "NOT_FOUND", info.value
    assert _names_field(info.value, FIELD), info.value
    assert MISSING in str(info.value) or any(MISSING in v.description for v in info.value.violations)


def test_unknown_adapter_is_not_found_async(server: ServerThread) -> None:
    async def run() -> SdserveError:
        async with AsyncClient(server.target) as c:
            with pytest.raises(SdserveError) as info:
                await c.generate("a red circle", adapters={"fine-name": 0.5, MISSING: 1.0}, steps=2, seed=1)
            return info.value

    err = asyncio.run(run())
    assert err.code == "NOT_FOUND", err
    # Both are unknown to the tiny server; the first one is the one named.
    assert _names_field(err, FIELD) or _names_field(err, "params.adapters[1].name"), err


def test_cli_unknown_lora_is_one_line(server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(server, "generate", "--prompt", "x", "--steps", "2", "--lora", MISSING, "--out", str(tmp_path / "x"))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdserve: error: "), lines
    assert FIELD in lines[0] or "NOT_FOUND" in lines[0], lines
    assert not (tmp_path / "x").exists()


def test_server_info_reports_the_adapter_limit(client: Client) -> None:
    adapters, most = client.list_adapters()
    assert most == 8  # the contract's default max_adapters
    assert all(a.name and a.sha256 for a in adapters), adapters


# The shipped shapes LoRA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes() -> Iterator[ServerThread]:
    if not SHAPES_LORA.is_dir():
        pytest.skip(f"{SHAPES_LORA.relative_to(REPO_ROOT)} is not in this checkout")
    assert (MODELS / "shapes" / "model_index.json").is_file(), "the embedded shapes model is missing"
    with serving(MODELS, default_model="shapes") as srv:
        yield srv


def _file_hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_cli_generate_with_the_shapes_lora(shapes: ServerThread, tmp_path: Path) -> None:
    name = SHAPES_LORA.name
    out = tmp_path / "lora.png"
    args = ("--prompt", PROMPT, "--seed", "3", "--lora", f"{name}:1", "--out", str(out), "--json")
    proc = run_cli(shapes, "generate", *args)
    assert proc.returncode == 0, proc.stderr
    assert f"+ adapters {name}:1@" in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    [adapter] = report["adapters"]
    assert (adapter["name"], adapter["kind"], adapter["scale"], adapter["token"]) == (name, "lora", 1.0, "")
    assert re.fullmatch(r"[0-9a-f]{64}", adapter["sha256"]), adapter
    assert adapter["sha256"] in _file_hashes(SHAPES_LORA), "sha256 is not one of the adapter folder's files"
    [echoed] = report["parameters"]["adapters"]
    assert (echoed["name"], echoed["kind"], echoed["scale"], echoed["sha256"]) == (
        name,
        "ADAPTER_KIND_LORA",
        1.0,
        adapter["sha256"],
    )
    assert report["parameters"]["prompt"] == PROMPT

    with Client(shapes.target) as c:
        # The same request from the client: the same bytes and the same typed identity, in Started and the result.
        events = list(c.stream_generate(PROMPT, seed=3, adapters=[(name, 1.0)]))
        started = [e for e in events if isinstance(e, Started)]
        result = [e for e in events if isinstance(e, Result)]
        assert len(started) == 1 and len(result) == 1, events
        expected = (ResolvedAdapter(name=name, kind="lora", scale=1.0, sha256=adapter["sha256"], token=""),)
        assert started[0].adapters == expected
        assert result[0].adapters == expected
        assert out.read_bytes() == result[0].image.data
        # The LoRA changes the image; at scale 0 it leaves the model's output unchanged.
        plain = c.generate(PROMPT, seed=3)
        off = c.generate(PROMPT, seed=3, adapters={name: 0.0})
        assert plain.adapters == ()
        assert (pixels(plain.image.data) != pixels(result[0].image.data)).any()
        assert (pixels(off.image.data) == pixels(plain.image.data)).all()
        adapters, _ = c.list_adapters()
        assert name in {a.name for a in adapters}
