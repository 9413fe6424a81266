"""A request is served by exactly the weights it names: stored variants of one revision never share a batch or a
prompt-cache entry, and Started, the result, the batch limits and `sdserve_model_loaded` say which weights ran."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sdserve import Client, Started
from service.settings import REPO_ROOT
from tests.harness import ServerThread, pixels, running
from tests.model_manager.harness import Sidecar
from tests.test_batching import TOLERANCE, call, pair, run_batched

# Strong guidance and an ancestral sampler make the variants' small weight differences visible in the pixels.
ASK = {"steps": 4, "seed": 11, "guidance_scale": 15.0, "scheduler": "EULER_ANCESTRAL"}
SHAPES = REPO_ROOT / "models" / "shapes"
VARIANTS = ("fp16", "int8")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A sidecar holding the embedded shapes model as `s`, fp32 plus its fp16 and int8 variants (one revision).
    (The random tiny model's variants differ by too few levels to tell apart from batching noise.)"""
    root = tmp_path_factory.mktemp("identity")
    car = Sidecar(root / "store", import_roots=[SHAPES.parent], args=["--quality-check", "false"]).start()
    with car.client() as mc:
        mc.import_model(str(SHAPES), name="s")
        for variant in VARIANTS:
            mc.create_variant("s", variant)
    try:
        yield car
    finally:
        car.stop()


def _server(models_dir: Path, store: Sidecar, **overrides: object) -> Iterator[ServerThread]:
    settings = {"max_batch_images": 8, "batch_policy": "fixed", "manager_target": store.target, "metrics_port": 0}
    settings.update(overrides)
    yield from running(models_dir, **settings)


@pytest.fixture(scope="module")
def server_s(models_dir: Path, store: Sidecar) -> Iterator[ServerThread]:
    yield from _server(models_dir, store, prompt_cache_bytes=64 << 20)


def solo(srv: ServerThread, model: str, prompt: str) -> bytes:
    with Client(srv.target) as c:
        return c.generate(prompt, model=model, **ASK).image.data  # type: ignore[arg-type]


def _far(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_variants_differ_so_the_checks_below_can_fail(server_s: ServerThread) -> None:
    apart = _far(solo(server_s, "s:fp16", "a red circle"), solo(server_s, "s:int8", "a red circle"))
    assert apart > 4 * TOLERANCE, apart


def test_alternating_variants_are_never_batched_together(server_s: ServerThread) -> None:
    expected = {v: solo(server_s, f"s:{v}", "a red circle") for v in VARIANTS}
    models = [f"s:{VARIANTS[i % 2]}" for i in range(4)]
    out = run_batched(server_s, [call("stream_generate", "a red circle", model=m, **ASK) for m in models])
    for model, outcome in zip(models, out, strict=True):
        started, result = pair(outcome)
        variant = model.split(":")[1]
        assert (started.model, started.model_variant) == ("s", variant)
        # Batches of one variant only: each same-variant pair shares one pipeline call.
        assert started.batch_size == 2
        other = VARIANTS[1 - VARIANTS.index(variant)]
        assert _far(result.image.data, expected[variant]) <= TOLERANCE, f"{model} differs from a solo {model} run"
        assert _far(result.image.data, expected[other]) > TOLERANCE, f"{model} was served by s:{other}'s weights"
        assert result.parameters["model_variant"] == variant


def test_prompt_cache_is_keyed_by_variant(server_s: ServerThread) -> None:
    assert server_s.server is not None
    cache = server_s.server.prompt_cache
    assert cache is not None
    prompt = "a blue triangle on the left"
    clean = {}
    for variant in VARIANTS:
        misses = cache.misses
        clean[variant] = solo(server_s, f"s:{variant}", prompt)
        # The other variant's embeddings of the same prompt are cached by now: they must not answer.
        assert cache.misses == misses + 1, f"s:{variant} was answered from another variant's cache entry"
    for variant in VARIANTS:
        hits = cache.hits
        assert solo(server_s, f"s:{variant}", prompt) == clean[variant]
        assert cache.hits == hits + 1


def test_started_result_and_metrics_name_the_weights(server_s: ServerThread) -> None:
    with Client(server_s.target) as c:
        for variant in VARIANTS:
            events = list(c.stream_generate("x", model=f"s:{variant}", steps=1, seed=1))
            started = next(e for e in events if isinstance(e, Started))
            assert (started.model_variant, started.dtype) == (variant, "float32")
            limits = {(b.model, b.variant) for b in c.server_info().batch_limits}
            assert ("s", variant) in limits
    assert server_s.server is not None
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server_s.server.metrics_port}/metrics").read().decode()
    for variant in VARIANTS:
        assert 'sdserve_model_loaded{dtype="float32",model="s",revision=' in scrape
        assert any(
            line.startswith("sdserve_model_loaded{") and f'variant="{variant}"' in line and line.endswith(" 1.0")
            for line in scrape.splitlines()
        ), variant
        assert any(
            line.startswith("sdserve_requests_total{") and f'variant="{variant}"' in line and 'model="s"' in line
            for line in scrape.splitlines()
        ), variant
