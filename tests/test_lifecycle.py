"""Cancellation, deadlines, queue limits, concurrency, seeds, previews, metadata and preserve_unmasked."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdserve import Client, Progress, Queued, Result, SdserveError, Started
from service import batch_call, imaging
from service.admission import LedgerEntry
from service.jobs import Job
from service.requests import GenerationRequest, Outcome, Task
from service.validation import bind
from tests.harness import TINY, ServerThread, pixels, png, running, sample_image, sample_mask, wait_ledger

LONG = {"steps": 150, "width": 256, "height": 256}


def ledger(server: ServerThread, request_id: str) -> LedgerEntry:
    assert server.server is not None
    entries = [e for e in server.server.admission.outcomes() if e.request_id == request_id]
    assert len(entries) == 1, entries
    return entries[0]


def until_progress(events: Iterator[object]) -> Progress:
    for ev in events:
        if isinstance(ev, Progress):
            return ev
    raise AssertionError("stream ended before any progress")


def test_cancel_running_stops_early_and_frees_the_slot(client: Client, server: ServerThread) -> None:
    stream = client.stream_generate("long", request_id="cancel-running", **LONG)  # type: ignore[arg-type]
    events = iter(stream)
    first = until_progress(events)
    stream.cancel()
    with pytest.raises(SdserveError) as info:
        list(events)
    assert info.value.code == "CANCELLED"
    entry = wait_ledger(server, "cancel-running")
    assert entry.outcome is Outcome.CANCELLED
    assert first.step <= entry.steps_done < 150
    assert not entry.decoded
    # The slot is free: the next request runs to completion.
    assert client.generate("next", steps=2).image.width == 64


def test_cancel_while_queued_never_runs(client: Client, server: ServerThread) -> None:
    blocker = client.stream_generate("blocker", request_id="blocker", **LONG)  # type: ignore[arg-type]
    blocker_events = iter(blocker)
    until_progress(blocker_events)
    queued = client.stream_generate("queued", request_id="queued-cancel", steps=2)
    queued_events = iter(queued)
    first = next(queued_events)
    assert isinstance(first, Queued)
    queued.cancel()
    entry = wait_ledger(server, "queued-cancel")
    assert entry.outcome is Outcome.CANCELLED
    assert not entry.started
    assert server.server is not None and server.server.queue.depth() == 0
    blocker.cancel()
    assert wait_ledger(server, "blocker").outcome is Outcome.CANCELLED


def test_deadline_stops_the_request(client: Client, server: ServerThread) -> None:
    with pytest.raises(SdserveError) as info:
        client.generate("slow", request_id="deadline", timeout=0.5, **LONG)  # type: ignore[arg-type]
    assert info.value.code == "DEADLINE_EXCEEDED"
    entry = wait_ledger(server, "deadline")
    assert entry.outcome in (Outcome.DEADLINE, Outcome.CANCELLED)
    assert entry.steps_done < 150 and not entry.decoded
    assert client.generate("after", steps=2).image.width == 64


def test_batch_call_stops_within_one_step_and_skips_decode(server: ServerThread, models_dir: Path) -> None:
    """An expired job stops at the first step boundary: one step run, no VAE decode, DEADLINE."""
    assert server.server is not None
    registry = server.server.registry
    entry = registry.lookup(TINY, Task.GENERATE)
    model = registry.get_loaded(entry)
    loop = asyncio.new_event_loop()
    try:
        req = GenerationRequest(task=Task.GENERATE, model=TINY, prompt="x", steps=50, seed=1)
        job = Job(bind(req, entry, server.server.choice), entry, loop, deadline=0.0)
        batch_call.run_batch(model, [job])
        assert job.steps_done == 0 and not job.decoded
        assert job.outcome is Outcome.DEADLINE
    finally:
        loop.close()


def test_max_queue_seconds_fails_without_running(client: Client, server: ServerThread) -> None:
    blocker = client.stream_generate("blocker", request_id="blocker-2", **LONG)  # type: ignore[arg-type]
    events = iter(blocker)
    start = until_progress(events)
    waiting = client.stream_generate("late", request_id="too-late", steps=2, max_queue_seconds=0.001)
    waiting_events = iter(waiting)
    assert isinstance(next(waiting_events), Queued)
    # Let the blocker run two more steps so the waiting request has certainly outwaited 1 ms.
    while until_progress(events).step < start.step + 2:
        pass
    blocker.cancel()
    with pytest.raises(SdserveError) as info:
        list(waiting_events)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "max_queue_seconds" in info.value.message
    entry = ledger(server, "too-late")
    assert entry.outcome is Outcome.DEADLINE and not entry.started


def test_queue_full_is_resource_exhausted_with_retry_info(models_dir: Path) -> None:
    for srv in running(models_dir, max_queue=1):
        with Client(srv.target) as c:
            blocker = c.stream_generate("blocker", **LONG)  # type: ignore[arg-type]
            until_progress(iter(blocker))
            queued = c.stream_generate("one", steps=2)
            assert isinstance(next(iter(queued)), Queued)
            with pytest.raises(SdserveError) as info:
                c.generate("two", steps=2)
            assert info.value.code == "RESOURCE_EXHAUSTED"
            assert info.value.retry_after_seconds is not None and info.value.retry_after_seconds > 0
            assert "queue" in info.value.message
            queued.cancel()
            blocker.cancel()


SCHEDS = ["DDIM", "EULER_ANCESTRAL", "DPMPP_2M", "UNIPC", "PNDM", "LCM"]


def test_concurrent_streams_with_different_schedulers_match_solo_runs(client: Client) -> None:
    solo = {s: client.generate("a blue square", steps=4, seed=11, scheduler=s).image.data for s in SCHEDS}  # type: ignore[arg-type]
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def run(s: str) -> None:
        try:
            results[s] = client.generate("a blue square", steps=4, seed=11, scheduler=s).image.data  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in SCHEDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == solo
    assert len(set(solo.values())) == len(SCHEDS)


def test_seed_is_echoed_and_reproduces(client: Client) -> None:
    events = list(client.stream_generate("seedless", steps=2, num_images=2))
    started = next(e for e in events if isinstance(e, Started))
    result = events[-1]
    assert isinstance(result, Result)
    seed = started.seeds[0]
    assert started.seeds == (seed, seed + 1)
    assert [i.seed for i in result.images] == [seed, seed + 1]
    assert result.parameters["seed"] == str(seed)
    again = client.generate("seedless", steps=2, seed=seed + 1)
    # Batch size changes CPU kernel blocking, so the last float bit may differ: within 1/255 per channel.
    assert np.abs(pixels(again.image.data) - pixels(result.images[1].data)).max() <= 1


def test_request_id_echoed(client: Client) -> None:
    events = list(client.stream_generate("x", steps=1, request_id="my-id-1"))
    assert next(e for e in events if isinstance(e, Started)).request_id == "my-id-1"
    result = events[-1]
    assert isinstance(result, Result) and result.request_id == "my-id-1"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_metadata_round_trip(client: Client, fmt: str) -> None:
    result = client.generate("meta prompt ü", negative_prompt="neg", steps=2, seed=99, output_format=fmt)  # type: ignore[arg-type]
    img = Image.open(io.BytesIO(result.image.data))
    assert img.format == fmt.upper()
    params = imaging.read_parameters(result.image.data)
    assert params is not None
    assert params["prompt"] == "meta prompt ü"
    assert params["negative_prompt"] == "neg"
    assert params["seed"] == 99
    assert params["steps"] == 2
    assert params["model"] == TINY
    assert params["model_revision"] == result.parameters["model_revision"]
    if fmt == "png":
        assert "Seed: 99" in img.info["parameters"]


def test_embed_parameters_off(client: Client) -> None:
    result = client.generate("x", steps=1, embed_parameters=False)
    assert imaging.read_parameters(result.image.data) is None


@pytest.mark.parametrize("mode", ["latent_rgb", "full_vae"])
def test_previews_every_n_steps(client: Client, mode: str) -> None:
    events = list(
        client.stream_generate("p", steps=5, seed=1, preview=mode, preview_every=2, preview_max_edge=32)  # type: ignore[arg-type]
    )
    progress = [e for e in events if isinstance(e, Progress)]
    with_previews = [p.step for p in progress if p.previews]
    assert with_previews == [2, 4, 5]
    shot = progress[1].previews[0]
    img = Image.open(io.BytesIO(shot.data))
    assert img.format == "JPEG" and max(img.size) == 32


@pytest.mark.parametrize(("size", "edge"), [(64, 64), (320, 256)])
def test_default_preview_edge_is_the_output_edge_capped(client: Client, size: int, edge: int) -> None:
    """Without max_edge a preview is as large as the image it previews, and never over 256 px."""
    events = list(client.stream_generate("p", steps=1, seed=1, width=size, height=64, preview="latent_rgb"))
    (shot,) = [e for e in events if isinstance(e, Progress)][-1].previews
    assert Image.open(io.BytesIO(shot.data)).size == (edge, edge * 64 // size)


def test_full_vae_preview_on_last_step_matches_result(client: Client) -> None:
    events = list(
        client.stream_generate(
            "p", steps=3, seed=4, preview="full_vae", preview_max_edge=64, preview_format="webp", preview_quality=100
        )
    )
    last = [e for e in events if isinstance(e, Progress)][-1].previews[0]
    result = events[-1]
    assert isinstance(result, Result)
    # Quality 100 WebP is lossless, and the last step's latents are the ones the result decodes.
    assert (pixels(last.data) == pixels(result.image.data)).all()


def test_preserve_unmasked_is_byte_exact(client: Client) -> None:
    image = sample_image()
    mask = sample_mask()
    for blur in (0, 4):
        r = client.inpaint(png(image), png(mask), "red", steps=3, seed=2, mask_blur=blur, preserve_unmasked=True)
        out = pixels(r.image.data)
        src = np.asarray(image, dtype=np.int16)
        outside = np.asarray(mask) < 128
        assert (out[outside] == src[outside]).all()
        assert (out[~outside] != src[~outside]).any()
    # Without it, the VAE round trip changes pixels outside the mask.
    r = client.inpaint(png(image), png(mask), "red", steps=3, seed=2)
    assert (
        pixels(r.image.data)[np.asarray(mask) < 128] != np.asarray(image, dtype=np.int16)[np.asarray(mask) < 128]
    ).any()


def test_invert_mask_swaps_the_repainted_part(client: Client) -> None:
    image = sample_image()
    mask = sample_mask()
    r = client.inpaint(png(image), png(mask), "red", steps=3, seed=2, invert_mask=True, preserve_unmasked=True)
    out = pixels(r.image.data)
    kept = np.asarray(mask) >= 128  # white is kept once inverted
    assert (out[kept] == np.asarray(image, dtype=np.int16)[kept]).all()


def test_generate_different_size(client: Client) -> None:
    r = client.generate("wide", steps=2, width=96, height=32, seed=1)
    assert (r.image.width, r.image.height) == (96, 32)
    assert torch.get_num_threads() >= 1
