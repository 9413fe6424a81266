"""SDXL through the real server: Generate, Edit and Inpaint (4- and 9-channel UNets) and base + refiner in both
modes equal direct diffusers calls with the same parameters and seeds; progress across both passes, cancellation
in either pass, batching, previews in SDXL's latent space, the prompt cache, and every new field's rules.

Tolerance against direct diffusers: every pixel within 1/255 (in practice identical: both paths run the same fp32
CPU kernels with the same per-image CPU generators; the server passes the text encoders' outputs as embeddings,
which diffusers computes the same way inside its call). Batched against solo: 2/255, as for SD 1.x.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service import schedulers
from service.tiny import build_tiny
from service.tiny_sdxl import build_tiny_sdxl
from tests.harness import ServerThread, png, running, sample_image, sample_mask, wait_ledger

TOLERANCE = 1
BATCH_TOLERANCE = 2
BASE, REFINER, INPAINT, SD15 = "xl", "xl-refiner", "xl-inpaint", "sd"
PROMPT, PROMPT_2, NEGATIVE = "a red cube on a table", "studio light, 35mm", "blurry"
SCHEDULER_ENUM = {
    "EULER": pb.SCHEDULER_EULER,
    "DPMPP_2M_KARRAS": pb.SCHEDULER_DPMPP_2M_KARRAS,
    "UNIPC": pb.SCHEDULER_UNIPC,
    "DDIM": pb.SCHEDULER_DDIM,
}


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sdxl-models")
    build_tiny_sdxl(root / BASE, seed=0, kind="base")
    build_tiny_sdxl(root / REFINER, seed=10, kind="refiner")
    build_tiny_sdxl(root / INPAINT, seed=20, kind="inpaint")
    build_tiny(root / SD15)
    return root


@pytest.fixture(scope="module")
def xl_server(xl_dir: Path) -> Iterator[ServerThread]:
    yield from running(xl_dir, default_model=BASE, max_batch_images=4, batch_policy="fixed")


@pytest.fixture()
def stub(xl_server: ServerThread) -> Iterator[pb_grpc.DiffusionServiceStub]:
    with grpc.insecure_channel(xl_server.target) as channel:
        yield pb_grpc.DiffusionServiceStub(channel)


# Direct diffusers, as a user would call it ------------------------------------------------------------------

_PIPES: dict[tuple[str, str], Any] = {}
_CLASSES = {
    "generate": diffusers.StableDiffusionXLPipeline,
    "edit": diffusers.StableDiffusionXLImg2ImgPipeline,
    "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
}


def pipe_of(folder: Path, task: str, scheduler: str) -> Any:
    key = (str(folder), task)
    if key not in _PIPES:
        pipe = _CLASSES[task].from_pretrained(folder, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.original_scheduler_config = dict(pipe.scheduler.config)
        _PIPES[key] = pipe
    pipe = _PIPES[key]
    cls_name, extra = schedulers.SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.original_scheduler_config, **extra)
    return pipe


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(i.convert("RGB"), dtype=np.int16) for i in images]


def decoded(result: pb.ResultEvent) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(i.data)).convert("RGB"), dtype=np.int16) for i in result.images]


def assert_close(ours: list[np.ndarray], theirs: list[np.ndarray], tolerance: int = TOLERANCE) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert int(np.abs(a - b).max()) <= tolerance


# Calling the server -----------------------------------------------------------------------------------------


def params(**kwargs: Any) -> pb.GenerationParams:
    base: dict[str, Any] = {"prompt": PROMPT, "steps": 5, "seed": 7}
    base.update(kwargs)
    return pb.GenerationParams(**base)


def events(stub: pb_grpc.DiffusionServiceStub, task: str, p: pb.GenerationParams, **extra: Any) -> list[Any]:
    if task == "generate":
        return list(stub.Generate(pb.GenerateRequest(params=p)))
    if task == "edit":
        return list(stub.Edit(pb.EditRequest(params=p, **extra)))
    return list(stub.Inpaint(pb.InpaintRequest(params=p, **extra)))


def result_of(evs: list[Any]) -> pb.ResultEvent:
    assert evs[-1].WhichOneof("event") == "result"
    return evs[-1].result  # type: ignore[no-any-return]


def violations(err: grpc.RpcError) -> dict[str, str]:
    trailers: Any = err.trailing_metadata()
    details = next(item[1] for item in trailers if item[0] == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(details)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return {v.field: v.description for v in bad.field_violations}


# Listing ------------------------------------------------------------------------------------------------------


def test_models_report_family_tasks_and_refiner(stub: pb_grpc.DiffusionServiceStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert models[BASE].family == "sdxl" and not models[BASE].refiner
    assert list(models[BASE].tasks) == [pb.TASK_GENERATE, pb.TASK_EDIT, pb.TASK_INPAINT]
    assert models[REFINER].refiner and list(models[REFINER].tasks) == [pb.TASK_EDIT, pb.TASK_INPAINT]
    assert list(models[INPAINT].tasks) == [pb.TASK_INPAINT] and models[INPAINT].unet_in_channels == 9
    assert models[SD15].family == "sd15"


# Parity with direct diffusers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["EULER", "DPMPP_2M_KARRAS", "UNIPC"])
def test_generate_equals_diffusers(stub: pb_grpc.DiffusionServiceStub, xl_dir: Path, scheduler: str) -> None:
    cond = pb.MicroConditioning(
        original_size=pb.ImageSize(width=128, height=96), crops_coords_top_left=pb.CropOffset(top=8, left=4)
    )
    p = params(
        prompt_2=PROMPT_2,
        negative_prompt=NEGATIVE,
        num_images=2,
        guidance_scale=6.0,
        scheduler=SCHEDULER_ENUM[scheduler],
        conditioning=cond,
    )
    ours = decoded(result_of(events(stub, "generate", p)))
    theirs = pipe_of(xl_dir / BASE, "generate", scheduler)(
        prompt=PROMPT,
        prompt_2=PROMPT_2,
        negative_prompt=NEGATIVE,
        num_inference_steps=5,
        guidance_scale=6.0,
        height=64,
        width=64,
        num_images_per_prompt=2,
        generator=gens(7, 2),
        original_size=(96, 128),
        crops_coords_top_left=(8, 4),
    ).images
    assert_close(ours, arrays(theirs))


@pytest.mark.parametrize("scheduler", ["EULER", "DDIM", "UNIPC"])
def test_edit_equals_diffusers(stub: pb_grpc.DiffusionServiceStub, xl_dir: Path, scheduler: str) -> None:
    image = sample_image(64, 64, seed=3)
    p = params(steps=6, scheduler=SCHEDULER_ENUM[scheduler])
    ours = decoded(result_of(events(stub, "edit", p, image=png(image), strength=0.6)))
    theirs = pipe_of(xl_dir / BASE, "edit", scheduler)(
        prompt=PROMPT, image=image, strength=0.6, num_inference_steps=6, generator=gens(7, 1)
    ).images
    assert_close(ours, arrays(theirs))


@pytest.mark.parametrize(("model", "scheduler"), [(BASE, "EULER"), (INPAINT, "DPMPP_2M_KARRAS"), (INPAINT, "DDIM")])
def test_inpaint_equals_diffusers(stub: pb_grpc.DiffusionServiceStub, xl_dir: Path, model: str, scheduler: str) -> None:
    """A 4-channel SDXL model and a 9-channel SDXL inpainting model both inpaint."""
    image, mask = sample_image(64, 64, seed=4), sample_mask(64, 64)
    p = params(model=model, scheduler=SCHEDULER_ENUM[scheduler], negative_prompt=NEGATIVE)
    ours = decoded(result_of(events(stub, "inpaint", p, image=png(image), mask=png(mask))))
    theirs = pipe_of(xl_dir / model, "inpaint", scheduler)(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        strength=1.0,  # the contract's default (diffusers' SDXL inpaint defaults to 0.9999)
        guidance_scale=5.0,  # the model's default (sdserve.json); diffusers' SDXL inpaint defaults to 7.5
        num_inference_steps=5,
        generator=gens(7, 1),
    ).images
    assert_close(ours, arrays(theirs))


def direct_refined(xl_dir: Path, scheduler: str, mode: str, steps: int, seed: int) -> list[np.ndarray]:
    """The ensemble-of-experts flow (or image refinement) as diffusers documents it; the refiner's generators are
    seeded afresh with the same seeds (what the server does)."""
    base = pipe_of(xl_dir / BASE, "generate", scheduler)
    refiner = pipe_of(xl_dir / REFINER, "edit", scheduler)
    if mode == "latent":
        latents = base(
            prompt=PROMPT, num_inference_steps=steps, denoising_end=0.75, output_type="latent", generator=gens(seed, 1)
        ).images
        out = refiner(
            prompt=PROMPT, image=latents, num_inference_steps=steps, denoising_start=0.75, generator=gens(seed, 1)
        ).images
    else:
        image = base(prompt=PROMPT, num_inference_steps=steps, generator=gens(seed, 1)).images
        out = refiner(
            prompt=PROMPT, image=image, num_inference_steps=steps, strength=0.4, generator=gens(seed, 1)
        ).images
    return arrays(out)


@pytest.mark.parametrize("scheduler", ["EULER", "DPMPP_2M_KARRAS", "UNIPC"])
@pytest.mark.parametrize("mode", ["latent", "image"])
def test_base_and_refiner_equal_diffusers(
    stub: pb_grpc.DiffusionServiceStub, xl_dir: Path, scheduler: str, mode: str
) -> None:
    if mode == "latent":
        refiner = pb.RefinerOptions(model=REFINER, mode=pb.REFINER_MODE_LATENT_HANDOFF, switch_at=0.75)
    else:
        refiner = pb.RefinerOptions(model=REFINER, mode=pb.REFINER_MODE_IMAGE, strength=0.4)
    p = params(steps=8, scheduler=SCHEDULER_ENUM[scheduler], refiner=refiner)
    evs = events(stub, "generate", p)
    result = result_of(evs)
    assert_close(decoded(result), direct_refined(xl_dir, scheduler, mode, 8, 7))
    progress = [e.progress for e in evs if e.WhichOneof("event") == "progress"]
    passes = [p.denoise_pass for p in progress]
    base_steps = passes.count(pb.DENOISE_PASS_BASE)
    # Every base step comes first, then every refiner step, each pass numbered 1..n of its own total (where the
    # hand-off falls depends on the scheduler's timesteps: Karras sigmas move it).
    assert base_steps >= 1 and passes == [pb.DENOISE_PASS_BASE] * base_steps + [pb.DENOISE_PASS_REFINER] * (
        len(passes) - base_steps
    )
    for part in (progress[:base_steps], progress[base_steps:]):
        assert part and [p.step for p in part] == list(range(1, len(part) + 1))
        assert {p.total_steps for p in part} == {len(part)}
    if mode == "image":
        assert len(progress) - base_steps == int(8 * 0.4)
    started = next(e.started for e in evs if e.WhichOneof("event") == "started")
    assert started.refiner_model == REFINER and started.refiner_model_revision
    assert result.parameters.refiner.model == REFINER
    assert result.parameters.refiner_model_revision == started.refiner_model_revision
    # The file says so too: A1111's refiner keys in `parameters`, the whole refiner pass in `sdserve`.
    info = Image.open(io.BytesIO(result.images[0].data)).info
    assert f"Refiner: {REFINER}" in info["parameters"]
    embedded = json.loads(info["sdserve"])
    assert embedded["refiner"]["model"] == REFINER and embedded["refiner"]["mode"] == (
        "latent_handoff" if mode == "latent" else "image"
    )
    assert embedded["conditioning"]["original_size"] == [64, 64]


# Passes, cancellation, batching, previews, the prompt cache ---------------------------------------------------


@pytest.mark.parametrize("cancel_in", [pb.DENOISE_PASS_BASE, pb.DENOISE_PASS_REFINER])
def test_cancel_in_either_pass_stops_it(
    xl_server: ServerThread, stub: pb_grpc.DiffusionServiceStub, cancel_in: int
) -> None:
    request_id = f"cancel-{cancel_in}"
    refiner = pb.RefinerOptions(model=REFINER, switch_at=0.5)
    call = stub.Generate(pb.GenerateRequest(params=params(steps=100, refiner=refiner, request_id=request_id)))
    for event in call:
        if event.WhichOneof("event") == "progress" and event.progress.denoise_pass == cancel_in:
            call.cancel()  # type: ignore[no-untyped-call]
            break
    entry = wait_ledger(xl_server, request_id)
    assert entry.outcome.value == "cancelled" and not entry.decoded
    if cancel_in == pb.DENOISE_PASS_BASE:
        assert entry.steps_done < 50
    else:
        assert 50 < entry.steps_done < 100


def test_deadline_is_honoured_in_the_refiner_pass(xl_server: ServerThread, xl_dir: Path) -> None:
    """A deadline that passes while the refiner runs ends the request there (DEADLINE_EXCEEDED, no result)."""
    request_id = "deadline-refiner"
    with grpc.insecure_channel(xl_server.target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        # The base pass is 1 step; the refiner's 149 at 256x256 take far longer than the deadline.
        refiner = pb.RefinerOptions(model=REFINER, switch_at=0.01)
        # Load and warm the refiner at this size first: a first use loads it inside the request, and on a busy
        # machine the load alone could outlast the deadline before any step runs.
        warm = params(steps=2, width=256, height=256, refiner=pb.RefinerOptions(model=REFINER, switch_at=0.5))
        assert list(stub.Generate(pb.GenerateRequest(params=warm)))[-1].WhichOneof("event") == "result"
        p = params(steps=150, width=256, height=256, refiner=refiner, request_id=request_id)
        with pytest.raises(grpc.RpcError) as info:
            for event in stub.Generate(pb.GenerateRequest(params=p), timeout=3.0):
                assert event.WhichOneof("event") != "result"
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    entry = wait_ledger(xl_server, request_id)
    assert entry.outcome.value == "deadline" and 1 <= entry.steps_done < 150 and not entry.decoded


def run_together(
    xl_server: ServerThread, stub: pb_grpc.DiffusionServiceStub, asks: list[pb.GenerationParams]
) -> list[list[Any]]:
    """Holds the worker with a long request, queues `asks`, then frees it so they can batch; returns their events."""
    blocker = stub.Generate(pb.GenerateRequest(params=params(steps=150, width=256, height=256)))
    next(e for e in blocker if e.WhichOneof("event") == "progress")
    assert xl_server.server is not None
    queue = xl_server.server.queue
    depth = queue.depth()
    outcomes: list[list[Any]] = [[] for _ in asks]

    def run(i: int) -> None:
        outcomes[i] = events(stub, "generate", asks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    assert queue.wait_depth(depth + len(asks), 60)
    blocker.cancel()  # type: ignore[no-untyped-call]
    for t in threads:
        t.join(120)
    return outcomes


def batch_sizes(outcomes: list[list[Any]]) -> list[int]:
    return [next(e.started.batch_size for e in evs if e.WhichOneof("event") == "started") for evs in outcomes]


def test_requests_batch_and_match_their_solo_images(
    xl_server: ServerThread, stub: pb_grpc.DiffusionServiceStub
) -> None:
    """Requests with different prompts (both encoders) share one call; each image matches the same request alone."""
    asks = [params(prompt="a blue ball", prompt_2="night"), params(prompt="green grass", seed=11)]
    solo = [decoded(result_of(events(stub, "generate", p))) for p in asks]
    outcomes = run_together(xl_server, stub, asks)
    assert batch_sizes(outcomes) == [2, 2]
    for i in range(2):
        assert_close(decoded(result_of(outcomes[i])), solo[i], BATCH_TOLERANCE)


def test_requests_that_cannot_share_a_call_do_not_batch(
    xl_server: ServerThread, stub: pb_grpc.DiffusionServiceStub
) -> None:
    """Micro-conditioning and the refiner pass are per call in diffusers: requests that differ in them run apart."""
    other = pb.MicroConditioning(original_size=pb.ImageSize(width=256, height=256))
    asks = [params(), params(conditioning=other), params(refiner=pb.RefinerOptions(model=REFINER))]
    assert batch_sizes(run_together(xl_server, stub, asks)) == [1, 1, 1]


@pytest.mark.parametrize("scheduler", [v for k, v in pb.Scheduler.items() if k != "SCHEDULER_UNSPECIFIED"])
def test_every_scheduler_runs_sdxl(stub: pb_grpc.DiffusionServiceStub, scheduler: int) -> None:
    result = result_of(events(stub, "generate", params(steps=3, scheduler=scheduler)))
    assert result.parameters.scheduler == scheduler and len(result.images) == 1


def test_latent_previews_use_the_fitted_projection(stub: pb_grpc.DiffusionServiceStub, xl_server: ServerThread) -> None:
    """LATENT_RGB previews project SDXL latents with the factors fitted on the model's VAE (its sdserve.json)."""
    assert xl_server.server is not None
    entry = xl_server.server.registry.entry_of(BASE)
    assert entry is not None
    meta_factors = entry.latent_rgb[0]
    from sdserve_core import families

    assert meta_factors != families.get("sdxl").latent_rgb[0]
    for mode in (pb.PREVIEW_MODE_LATENT_RGB, pb.PREVIEW_MODE_FULL_VAE):
        p = params(steps=3, preview=pb.PreviewOptions(mode=mode))
        shots = [e.progress.previews for e in events(stub, "generate", p) if e.WhichOneof("event") == "progress"]
        assert len(shots) == 3 and all(len(s) == 1 for s in shots)
        assert Image.open(io.BytesIO(shots[-1][0].data)).size == (64, 64)


def test_prompt_cache_holds_both_encoders_and_pooled(
    xl_server: ServerThread, stub: pb_grpc.DiffusionServiceStub
) -> None:
    """A repeated request reuses the cached embeddings (both encoders' and the pooled ones) and makes the same image;
    changing only prompt_2 is a new entry."""
    assert xl_server.server is not None
    cache = xl_server.server.prompt_cache
    assert cache is not None
    p = params(prompt="cache me", prompt_2="and me", negative_prompt="not me", seed=3)
    first = decoded(result_of(events(stub, "generate", p)))
    hits, misses = cache.hits, cache.misses
    second = decoded(result_of(events(stub, "generate", p)))
    assert (cache.hits, cache.misses) == (hits + 1, misses)
    assert_close(first, second, 0)
    events(stub, "generate", params(prompt="cache me", prompt_2="other", negative_prompt="not me", seed=3))
    assert cache.misses == misses + 1
    with cache._lock:
        texts = (("cache me", 1.0),), (("and me", 1.0),)
        entries = [v for k, v in cache._items.items() if (k[1][0], k[1][2]) == texts]
    assert len(entries) == 1
    embeds = entries[0]
    assert embeds.pooled is not None and embeds.negative_pooled is not None and embeds.negative is not None
    assert embeds.positive.shape[-1] == 64  # both encoders' 32 features side by side


# Rules --------------------------------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("generate", {"model": SD15, "prompt_2": "x"}, "params.prompt_2", "SDXL"),
    ("generate", {"model": SD15, "negative_prompt_2": "x"}, "params.negative_prompt_2", "SDXL"),
    (
        "generate",
        {"model": SD15, "conditioning": pb.MicroConditioning(target_size=pb.ImageSize(width=8, height=8))},
        "params.conditioning",
        "SDXL",
    ),
    ("generate", {"model": SD15, "refiner": pb.RefinerOptions(model=REFINER)}, "params.refiner", "SDXL"),
    ("generate", {"prompt_2": "x" * 2001}, "params.prompt_2", "at most"),
    ("generate", {"negative_prompt_2": "x" * 2001}, "params.negative_prompt_2", "at most"),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(original_size=pb.ImageSize(width=0, height=64))},
        "params.conditioning.original_size.width",
        "between 1 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(target_size=pb.ImageSize(width=64, height=20000))},
        "params.conditioning.target_size.height",
        "between 1 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(negative_original_size=pb.ImageSize(width=64))},
        "params.conditioning.negative_original_size.height",
        "between 1 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(negative_target_size=pb.ImageSize(height=64))},
        "params.conditioning.negative_target_size.width",
        "between 1 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(crops_coords_top_left=pb.CropOffset(top=20000))},
        "params.conditioning.crops_coords_top_left.top",
        "between 0 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(negative_crops_coords_top_left=pb.CropOffset(left=20000))},
        "params.conditioning.negative_crops_coords_top_left.left",
        "between 0 and",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(aesthetic_score=11.0)},
        "params.conditioning.aesthetic_score",
        "[0, 10]",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(negative_aesthetic_score=-1.0)},
        "params.conditioning.negative_aesthetic_score",
        "[0, 10]",
    ),
    (
        "generate",
        {"conditioning": pb.MicroConditioning(aesthetic_score=5.0)},
        "params.conditioning.aesthetic_score",
        "refiner",
    ),
    ("generate", {"refiner": pb.RefinerOptions()}, "params.refiner.model", "required"),
    ("generate", {"refiner": pb.RefinerOptions(model="x" * 201)}, "params.refiner.model", "at most 200"),
    ("generate", {"refiner": pb.RefinerOptions(model=REFINER, mode=7)}, "params.refiner.mode", "unknown"),  # type: ignore[arg-type]
    ("generate", {"refiner": pb.RefinerOptions(model=REFINER, switch_at=0.0)}, "params.refiner.switch_at", "(0, 1]"),
    ("generate", {"refiner": pb.RefinerOptions(model=REFINER, switch_at=1.0)}, "params.refiner.switch_at", "below 1"),
    (
        "generate",
        {"refiner": pb.RefinerOptions(model=REFINER, switch_at=0.5, mode=pb.REFINER_MODE_IMAGE)},
        "params.refiner.switch_at",
        "LATENT_HANDOFF only",
    ),
    (
        "generate",
        {"refiner": pb.RefinerOptions(model=REFINER, strength=0.5)},
        "params.refiner.strength",
        "IMAGE only",
    ),
    (
        "generate",
        {"refiner": pb.RefinerOptions(model=REFINER, strength=1.5, mode=pb.REFINER_MODE_IMAGE)},
        "params.refiner.strength",
        "(0, 1]",
    ),
    (
        "generate",
        {"steps": 2, "refiner": pb.RefinerOptions(model=REFINER, strength=0.1, mode=pb.REFINER_MODE_IMAGE)},
        "params.refiner.strength",
        "steps x strength",
    ),
    (
        "generate",
        {"steps": 4, "refiner": pb.RefinerOptions(model=REFINER, switch_at=0.2)},
        "params.refiner.switch_at",
        "each needs at least 1",
    ),
]


@pytest.mark.parametrize(("task", "fields", "field", "words"), BAD)
def test_new_fields_are_validated(
    xl_server: ServerThread,
    stub: pb_grpc.DiffusionServiceStub,
    task: str,
    fields: dict[str, Any],
    field: str,
    words: str,
) -> None:
    assert xl_server.server is not None
    before = xl_server.server.queue.depth()
    with pytest.raises(grpc.RpcError) as info:
        events(stub, task, params(**fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    found = violations(info.value)
    assert field in found, found
    assert words in found[field], found[field]
    assert xl_server.server.queue.depth() == before


def test_edit_refiner_rules(stub: pb_grpc.DiffusionServiceStub) -> None:
    """An Edit whose strength starts after the hand-off would run no base step; Inpaint takes no refiner."""
    image = png(sample_image(64, 64))
    refiner = pb.RefinerOptions(model=REFINER, switch_at=0.8)
    with pytest.raises(grpc.RpcError) as info:
        events(stub, "edit", params(refiner=refiner), image=image, strength=0.1)
    assert "starts after the hand-off" in violations(info.value)["params.refiner.switch_at"]
    with pytest.raises(grpc.RpcError) as info:
        events(stub, "inpaint", params(refiner=refiner), image=image, mask=png(sample_mask(64, 64)))
    assert "Inpaint" in violations(info.value)["params.refiner"]


@pytest.mark.parametrize(
    ("refiner", "code", "words"),
    [
        ("no-such-model", grpc.StatusCode.NOT_FOUND, "params.refiner.model"),
        (SD15, grpc.StatusCode.FAILED_PRECONDITION, "cannot refine"),
        (INPAINT, grpc.StatusCode.FAILED_PRECONDITION, "cannot refine"),
    ],
)
def test_refiner_lookup(stub: pb_grpc.DiffusionServiceStub, refiner: str, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        events(stub, "generate", params(refiner=pb.RefinerOptions(model=refiner)))
    assert info.value.code() == code
    assert words in (info.value.details() or "")


def test_a_refiner_cannot_generate_but_edits(stub: pb_grpc.DiffusionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        events(stub, "generate", params(model=REFINER))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "refiner" in (info.value.details() or "")
    cond = pb.MicroConditioning(aesthetic_score=7.5, negative_aesthetic_score=1.0)
    result = result_of(events(stub, "edit", params(model=REFINER, conditioning=cond), image=png(sample_image())))
    assert result.parameters.conditioning.aesthetic_score == pytest.approx(7.5)
