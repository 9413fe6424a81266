"""Dynamic batching: batched images match solo runs, cancelled members drop out, the policy learns limits,
and the prompt-embedding cache returns identical embeddings."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sdserve import Client, Progress, Result, SdserveError, Started
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from service.batching import BatchPolicy
from service.prompt_cache import Key, PromptCache, cache_key
from service.requests import ServedIdentity
from tests.harness import ServerThread, pixels, png, running, sample_image, sample_mask, wait_ledger

# Batch size changes how CPU kernels block their sums, so the last bits of floats differ: every pixel of a
# batched image is within 2/255 of the same request run alone (measured maximum here: 1/255).
TOLERANCE = 2
LONG = {"steps": 150, "width": 256, "height": 256}


@pytest.fixture(scope="module")
def batching_server(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, max_batch_images=4, batch_policy="fixed")


def run_batched(srv: ServerThread, calls: list[Callable[[Client], object]]) -> list[object]:
    """Holds the worker with a long request, queues `calls`, then frees the worker so they batch together."""
    results: list[object] = [None] * len(calls)
    with Client(srv.target) as c:
        blocker = c.stream_generate("blocker", **LONG)  # type: ignore[arg-type]
        events = iter(blocker)
        next(e for e in events if isinstance(e, Progress))
        assert srv.server is not None
        queue = srv.server.queue
        base = queue.depth()

        def run(i: int) -> None:
            try:
                results[i] = calls[i](c)
            except SdserveError as err:
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        assert queue.wait_depth(base + len(calls), 60), "requests did not queue"
        blocker.cancel()
        for t in threads:
            t.join(120)
    return results


def stream_result(stream: Iterable[object]) -> tuple[Started, Result]:
    events = list(stream)
    started = next(e for e in events if isinstance(e, Started))
    result = events[-1]
    assert isinstance(result, Result)
    return started, result


def pair(outcome: object) -> tuple[Started, Result]:
    assert isinstance(outcome, tuple), outcome
    started, result = outcome
    assert isinstance(started, Started) and isinstance(result, Result)
    return started, result


def call(method: str, *args: object, **kwargs: object) -> Callable[[Client], object]:
    """A call of `Client.<method>(*args, **kwargs)` returning (Started, Result)."""

    def run(c: Client) -> object:
        return stream_result(getattr(c, method)(*args, **kwargs))

    return run


def assert_close(a: bytes, b: bytes) -> None:
    assert int(np.abs(pixels(a) - pixels(b)).max()) <= TOLERANCE


def test_generate_batched_matches_solo(batching_server: ServerThread) -> None:
    prompts = ["a red circle", "a blue square", "a green triangle"]
    out = run_batched(
        batching_server,
        [call("stream_generate", p, seed=10 + i, steps=6, negative_prompt=f"n{i}") for i, p in enumerate(prompts)],
    )
    with Client(batching_server.target) as c:
        for i, (p, res) in enumerate(zip(prompts, out, strict=True)):
            started, result = pair(res)
            assert started.batch_size == 3
            solo = c.generate(p, seed=10 + i, steps=6, negative_prompt=f"n{i}")
            assert_close(result.image.data, solo.image.data)


def test_edit_batched_matches_solo(batching_server: ServerThread) -> None:
    images = [png(sample_image(seed=i)) for i in range(2)]
    out = run_batched(
        batching_server,
        [call("stream_edit", images[i], f"edit {i}", strength=0.7, steps=6, seed=i) for i in range(2)],
    )
    with Client(batching_server.target) as c:
        for i, res in enumerate(out):
            started, result = pair(res)
            assert started.batch_size == 2
            assert_close(result.image.data, c.edit(images[i], f"edit {i}", strength=0.7, steps=6, seed=i).image.data)


def test_inpaint_batched_matches_solo(batching_server: ServerThread) -> None:
    image, mask = png(sample_image()), png(sample_mask())
    out = run_batched(
        batching_server,
        [
            call("stream_inpaint", image, mask, f"fill {i}", steps=5, seed=i, num_images=2, preserve_unmasked=i == 1)
            for i in range(2)
        ],
    )
    with Client(batching_server.target) as c:
        for i, res in enumerate(out):
            started, result = pair(res)
            assert started.batch_size == 2
            solo = c.inpaint(image, mask, f"fill {i}", steps=5, seed=i, num_images=2, preserve_unmasked=i == 1)
            for got, want in zip(result.images, solo.images, strict=True):
                assert_close(got.data, want.data)


def test_cancelled_member_drops_out(batching_server: ServerThread) -> None:
    def cancelled(c: Client) -> object:
        stream = c.stream_generate("cancel me", seed=1, steps=30, request_id="batch-cancel")
        for ev in stream:
            if isinstance(ev, Progress):
                stream.cancel()
        return "finished"

    out = run_batched(
        batching_server,
        [cancelled, call("stream_generate", "keep me", seed=2, steps=30)],
    )
    assert isinstance(out[0], SdserveError) and out[0].code == "CANCELLED"
    started, result = pair(out[1])
    assert started.batch_size == 2
    with Client(batching_server.target) as c:
        assert_close(result.image.data, c.generate("keep me", seed=2, steps=30).image.data)


def test_batch_stops_when_every_member_is_cancelled(batching_server: ServerThread) -> None:
    def cancelled(i: int) -> Callable[[Client], object]:
        def run(c: Client) -> object:
            stream = c.stream_generate("all cancel", seed=i, steps=150, request_id=f"all-cancel-{i}")
            for ev in stream:
                if isinstance(ev, Progress):
                    stream.cancel()
            return "finished"

        return run

    out = run_batched(batching_server, [cancelled(0), cancelled(1)])
    assert all(isinstance(o, SdserveError) and o.code == "CANCELLED" for o in out)
    entries = [wait_ledger(batching_server, f"all-cancel-{i}") for i in range(2)]
    assert all(e.steps_done < 150 and not e.decoded for e in entries)


M = ServedIdentity("m", "r", "fp32", "m")


def test_policy_explores_while_faster_and_settles() -> None:
    policy = BatchPolicy(max_images=8)
    key = (M, 64, 64, "fast")
    policy.observe(key, 1, 0.100)
    assert policy.limits()[0].max_images == 2  # only batch 1 measured: try 2
    policy.observe(key, 2, 0.120)  # 60 ms per image: better
    assert policy.limits()[0].max_images == 4
    policy.observe(key, 4, 0.200)  # 50 ms per image: better still
    assert policy.limits()[0].max_images == 8
    policy.observe(key, 8, 0.480)  # 60 ms per image: worse than 4
    assert policy.limits()[0].max_images == 4
    big = (M, 512, 512, "fast")
    policy.observe(big, 1, 1.0)
    policy.observe(big, 2, 2.4)  # batching hurts large latents
    assert [lim.max_images for lim in policy.limits() if lim.width == 512] == [1]


def test_policy_never_exceeds_max() -> None:
    policy = BatchPolicy(max_images=3)
    key = (M, 8, 8, "fast")
    for size, t in ((1, 1.0), (2, 1.0), (3, 1.0)):
        policy.observe(key, size, t)
    assert policy.limits()[0].max_images == 3


def test_server_info_shows_calibrated_limits(server: ServerThread) -> None:
    with Client(server.target) as c:
        info = c.server_info()
    limits = [(b.model, b.width, b.height, b.source) for b in info.batch_limits]
    assert ("tiny-sd", 64, 64, "calibrated") in limits
    assert all(1 <= b.max_batch_images <= 8 for b in info.batch_limits)


def test_prompt_cache_hits_give_identical_images(server: ServerThread) -> None:
    assert server.server is not None
    cache = server.server.prompt_cache
    assert cache is not None
    with Client(server.target) as c:
        first = c.generate("cache me please", seed=3, steps=2)
        hits = cache.hits
        second = c.generate("cache me please", seed=3, steps=2)
        assert cache.hits == hits + 1
        assert first.image.data == second.image.data
        # The same parse, written differently: a hit, and the same pixels as encoding it afresh.
        hits = cache.hits
        weighted = c.generate("(cache me please:1)", seed=3, steps=2)
        assert cache.hits == hits + 1
        assert (pixels(weighted.image.data) == pixels(first.image.data)).all()


def key(
    identity: ServedIdentity,
    prompt: str,
    negative: str = "",
    cfg: bool = True,
    prompt_2: str = "",
    negative_prompt_2: str = "",
) -> Key:
    return cache_key(identity, PromptInputs(prompt, negative, prompt_2, negative_prompt_2), cfg)


def test_prompt_cache_is_bounded_in_bytes() -> None:
    one = PromptEmbeds(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8))
    size = 2 * 77 * 8 * 4
    cache = PromptCache(max_bytes=size * 2 + 10)
    for i in range(5):
        cache.get(key(M, f"p{i}"), lambda: one)
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.misses == 5 and cache.hits == 0
    cache.get(key(M, "p4"), lambda: one)
    assert cache.hits == 1
    # Different negative prompts, second-encoder prompts, clip skip or guidance are different keys; negatives are
    # ignored without guidance.
    assert key(M, "p", "a") != key(M, "p", "b")
    assert key(M, "p", "a", cfg=False) == key(M, "p", "b", cfg=False)
    assert key(M, "p", prompt_2="x") != key(M, "p", prompt_2="y")
    assert key(M, "p", negative_prompt_2="x") != key(M, "p")
    assert key(M, "p", negative_prompt_2="x", cfg=False) == key(M, "p", cfg=False)
    assert cache_key(M, PromptInputs("p", clip_skip=1), True) != key(M, "p")
    # The stored weights variant is part of the key: an int8 text encoder never answers for an fp16 one.
    int8 = ServedIdentity("m", "r", "int8", "m@r:int8")
    assert key(M, "p") != key(int8, "p")
    cache.get(key(int8, "p4"), lambda: one)
    # Pooled embeddings (SDXL) count toward the bound too.
    pooled = PromptEmbeds(torch.zeros(1, 77, 8), None, torch.zeros(1, 8))
    assert pooled.nbytes == (77 * 8 + 8) * 4
    assert cache.hits == 1 and cache.misses == 6


def test_policy_measures_an_uncalibrated_size_alone_and_never_retries_a_slower_batch() -> None:
    """The mid-size SD 1.5 case: calibrated at 512 px, served at 256 px. The served size runs alone first, then
    tries 2; once 2 measured slower per image, the limit is 1 and stays 1 (no exploration of 2 or 4 again)."""
    policy = BatchPolicy(max_images=8)
    policy.observe((M, 512, 512, "fast"), 1, 4.0, "calibrated")
    job_key = (M, 256, 256, "fast")
    assert policy.limit_for(job_key) == 1  # never measured: alone first
    policy.observe(job_key, 2, 2.2)  # a batch measured before any single image (another limit's live batch)
    assert policy.limit_for(job_key) == 1
    policy.observe(job_key, 1, 1.0)
    # 1.1 s per image in a batch of 2 against 1.0 alone: batching is slower here, and is not tried again.
    for _ in range(5):
        assert policy.limit_for(job_key) == 1
        policy.observe(job_key, 1, 1.0)
    fast = (M, 128, 128, "fast")
    policy.observe(fast, 1, 1.0)
    assert policy.limit_for(fast) == 2  # measured alone: batching may be tried


def test_the_prompt_cache_keys_on_the_parsed_prompt() -> None:
    """Texts that parse to the same fragments and weights share an entry (they encode to the same tensors, see
    tests/test_weighted_prompts.py); texts whose parse differs do not."""
    assert key(M, "a (red:1.1) circle") == key(M, "a (red) circle")
    assert key(M, "red") == key(M, "(red:1)")
    assert key(M, "a red circle", "(blurry:1.0)") == key(M, "a red circle", "blurry")
    assert key(M, "a (red) circle") != key(M, "a red circle")
    assert key(M, "a [red] circle") != key(M, "a (red) circle")
    assert key(M, r"a \(red\) circle") != key(M, "a (red) circle")
    assert key(M, "a BREAK b") != key(M, "a b")
    assert key(M, "a", prompt_2="(b:1.1)") == key(M, "a", prompt_2="(b)")
