"""Runs one pipeline call for a batch of compatible jobs and posts their events."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from PIL import Image

from sdserve_core import families
from sdserve_core.memory import MemoryPlan
from sdserve_core.pipeline.adapters import lora_active
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import prepare
from sdserve_core.pipeline.steps import StepCallback, StopDenoising
from sdserve_core.profiles import Profile
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.weighted import TokenEmbedding
from service import postprocess, previews, schedulers, tracing
from service.jobs import Job
from service.models import LoadedModel
from service.prompt_cache import PromptCache, cache_key
from service.requests import InpaintArea, PreviewMode, Progress, RefinerMode, Result, Task, Timings

# (job, index of its first image in the batch, its image count)
Span = tuple[Job, int, int]


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What one pipeline call did: images, denoising steps finished, and the denoising loop's seconds."""

    images: int
    steps: int
    denoise_seconds: float
    # Seconds per step between the first and last step callbacks (setup excluded); 0 when unknown.
    step_seconds: float


@dataclasses.dataclass(frozen=True)
class Adapters:
    """A batch's adapters as the base pass runs them: the LoRAs loaded in the model (peft names and scales) and the
    embeddings its prompts use (token -> vectors)."""

    loras: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    vocab: dict[str, TokenEmbedding] = dataclasses.field(default_factory=dict)


NO_ADAPTERS = Adapters()


def encode_prompts(
    model: LoadedModel, jobs: list[Job], cfg: bool, cache: PromptCache | None, adapters: Adapters = NO_ADAPTERS
) -> PromptEmbeds:
    """Text embeddings for every image of every job, in batch order (through the cache when given), by `model`'s
    text encoders (a refiner pass encodes with the refiner's, without adapters). The cache keys on the adapters
    that change the text encoders (their sha256 and scale) besides the prompt inputs."""
    family = families.get(model.components.family)
    parts: list[PromptEmbeds] = []
    for job in jobs:
        inputs = job.resolved.prompt_inputs
        text_adapters = tuple((u.sha256, u.scale) for u in job.resolved.adapters if u.touches_text)
        if adapters is NO_ADAPTERS:
            text_adapters = ()

        def compute(inputs: PromptInputs = inputs) -> PromptEmbeds:
            device = model.choice.device
            return family.encode_prompt(model.components, inputs, cfg, device, vocab=adapters.vocab)

        key = cache_key(model.entry.identity, inputs, cfg, text_adapters)
        embeds = compute() if cache is None else cache.get(key, compute)
        parts.append(embeds.repeat(job.resolved.num_images))
    return PromptEmbeds.cat(parts)


def build_call(
    model: LoadedModel, jobs: list[Job], cache: PromptCache | None, adapters: Adapters = NO_ADAPTERS
) -> PipelineCall:
    """The pipeline call of a batch (equal batch keys): the jobs' embeddings, seeds, init images and masks."""
    first = jobs[0].resolved
    cfg = first.guidance_scale > 1.0
    generators = tuple(torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.resolved.seeds)
    with torch.inference_mode():
        embeds = encode_prompts(model, jobs, cfg, cache, adapters)
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    if first.task is not Task.GENERATE:
        for job in jobs:
            imgs, msks = postprocess.prepare_inputs(job)
            images += imgs
            masks += msks
    inpaint = first.task is Task.INPAINT
    handoff = first.refiner is not None and first.refiner.mode is RefinerMode.LATENT_HANDOFF
    mask_padding = None
    if inpaint:
        spec = first.request.inpaint
        assert spec is not None
        # Cropped jobs never share a call (their batch keys differ), so the crop is the call's.
        mask_padding = spec.mask_padding if spec.area is InpaintArea.MASK_ONLY else None
    return PipelineCall(
        task=first.task,
        steps=first.steps,
        width=first.width,
        height=first.height,
        generators=generators,
        # A hand-off to the refiner passes the latents on undecoded.
        output_type="latent" if handoff else "pil",
        guidance_scale=first.guidance_scale,
        embeds=embeds,
        images=None if first.task is Task.GENERATE else tuple(images),
        masks=tuple(masks) if inpaint else None,
        strength=None if first.task is Task.GENERATE else first.strength,
        mask_padding=mask_padding,
        conditioning=first.conditioning,
        denoising_end=first.refiner.switch_at if handoff and first.refiner is not None else None,
    )


def refiner_call(refiner: LoadedModel, jobs: list[Job], base_out: Any, cache: PromptCache | None) -> PipelineCall:
    """The refiner pass of a batch: an Edit call on the refiner over the base pass's output, with the refiner's own
    prompt embeddings and generators seeded afresh with the images' seeds. LATENT_HANDOFF starts from the base
    pass's latents at `switch_at` of the schedule (diffusers' denoising_start); IMAGE refines the decoded images
    at the refiner's strength."""
    first = jobs[0].resolved
    spec = first.refiner
    assert spec is not None
    cfg = first.guidance_scale > 1.0
    with torch.inference_mode():
        embeds = encode_prompts(refiner, jobs, cfg, cache)
    handoff = spec.mode is RefinerMode.LATENT_HANDOFF
    return PipelineCall(
        task=Task.EDIT,
        steps=first.steps,
        width=first.width,
        height=first.height,
        generators=tuple(torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.resolved.seeds),
        output_type="pil",
        guidance_scale=first.guidance_scale,
        embeds=embeds,
        images=base_out if handoff else tuple(base_out),
        strength=None if handoff else spec.strength,
        conditioning=first.conditioning,
        denoising_start=spec.switch_at if handoff else None,
    )


class BatchObserver:
    """Watches a batch's steps: ends jobs that were cancelled or ran out of time, stops the loop when none is
    left, and posts each live job's progress with its due previews."""

    def __init__(self, model: LoadedModel, spans: list[Span], denoise_pass: str = "base", steps_before: int = 0):
        self.model = model
        self.spans = spans
        self.denoise_pass = denoise_pass
        # Steps of earlier passes: a job's steps_done counts every pass's.
        self.steps_before = steps_before

    def go_on(self) -> bool:
        now = time.monotonic()
        live = False
        for job, _, _ in self.spans:
            if job.finished:
                continue
            if job.should_stop(now):
                job.post(job.stop_event(now))
            else:
                live = True
        return live

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        for job, start, count in self.spans:
            if job.finished:
                continue
            spec = job.resolved.request.preview
            shots: tuple[Any, ...] = ()
            due = step % spec.every_n_steps == 0 or step == total
            if spec.mode is not PreviewMode.NONE and due:
                r = job.resolved
                shots = previews.render(self.model, latents[start : start + count], spec, max(r.width, r.height))
            job.steps_done = self.steps_before + step
            job.post(Progress(step=step, total_steps=total, previews=shots, denoise_pass=self.denoise_pass))


def spans_of(jobs: list[Job]) -> list[Span]:
    """Each job with the index of its first image in the batch and its image count."""
    spans: list[Span] = []
    offset = 0
    for job in jobs:
        spans.append((job, offset, job.resolved.num_images))
        offset += job.resolved.num_images
    return spans


def run_batch(
    model: LoadedModel,
    jobs: list[Job],
    cache: PromptCache | None = None,
    refiner: LoadedModel | None = None,
    memory: MemoryPlan | None = None,
    adapters: Adapters = NO_ADAPTERS,
    profile: Profile | None = None,
) -> BatchStats:
    """Runs `jobs` (equal batch keys) as one pipeline call, and a refiner pass after it when they have one (on
    `refiner`, loaded by the caller), with the `memory` strategies and the batch's `adapters` (its LoRAs active in
    the model for the call, inactive afterwards whatever happens), the base pass in the execution `profile` (None:
    exact; the refiner pass runs exact); posts progress and results, or raises."""
    with lora_active(model.components, adapters.loras):
        return _run_batch(model, jobs, cache, refiner, memory, adapters, profile)


def _run_batch(
    model: LoadedModel,
    jobs: list[Job],
    cache: PromptCache | None,
    refiner: LoadedModel | None,
    memory: MemoryPlan | None,
    adapters: Adapters,
    profile: Profile | None,
) -> BatchStats:
    first = jobs[0].resolved
    t_start = time.perf_counter()
    scheduler = schedulers.build(first.scheduler, model.entry.scheduler_config)
    spans = spans_of(jobs)
    call = dataclasses.replace(build_call(model, jobs, cache, adapters), memory=memory, profile=profile)
    prepared = prepare(model.components, call, scheduler)
    t_prepared = time.perf_counter()
    trace = tracing.BatchTrace(jobs)
    trace.mark("prepare", t_start, t_prepared)
    clock = StepCallback(BatchObserver(model, spans))
    last = clock
    try:
        with trace.denoise("base", clock):
            images: Any = prepared(clock)
        if refiner is not None:
            last = StepCallback(BatchObserver(refiner, spans, "refiner", max(j.steps_done for j in jobs)))
            with trace.denoise("refiner", last):
                images = _refine(refiner, jobs, images, cache, last, memory)
    except StopDenoising:
        return _stats(call.count, jobs, clock, t_prepared)
    t_decoded = time.perf_counter()
    trace.mark("vae_decode", last.last or t_prepared, t_decoded)
    for job in jobs:
        job.decoded = True
    _post_results(spans, images, last, (t_start, t_prepared, t_decoded))
    return _stats(call.count, jobs, clock, t_prepared)


def _refine(
    refiner: LoadedModel,
    jobs: list[Job],
    base_out: Any,
    cache: PromptCache | None,
    clock: StepCallback,
    memory: MemoryPlan | None,
) -> Any:
    """The refiner pass over the base pass's output (StopDenoising when every job ended meanwhile)."""
    assert clock.observer is not None
    if not clock.observer.go_on():
        raise StopDenoising
    first = jobs[0].resolved
    scheduler = schedulers.build(first.scheduler, refiner.entry.scheduler_config)
    call = dataclasses.replace(refiner_call(refiner, jobs, base_out, cache), memory=memory)
    return prepare(refiner.components, call, scheduler)(clock)


def _post_results(
    spans: list[Span], images: list[Image.Image], clock: StepCallback, marks: tuple[float, float, float]
) -> None:
    """Posts each live job's encoded images and timings (or its stop event if it was stopped meanwhile)."""
    t_start, t_prepared, t_decoded = marks
    denoised = clock.last or t_prepared
    now = time.monotonic()
    for job, start, count in spans:
        if job.finished:
            continue
        if job.should_stop(now):
            job.post(job.stop_event(now))
            continue
        t_enc = time.perf_counter()
        results = postprocess.finish_images(job, images[start : start + count])
        t_done = time.perf_counter()
        tracing.span(job, "encode", t_enc, t_done, len(spans))
        timings = Timings(
            queue=(job.started_at or job.enqueued_at) - job.enqueued_at,
            prepare=t_prepared - t_start,
            denoise=denoised - t_prepared,
            decode=t_decoded - denoised,
            encode=t_done - t_enc,
            total=time.monotonic() - job.arrived_at,
            preview=clock.preview,
        )
        job.post(Result(images=tuple(results), resolved=job.resolved, timings=timings))


def _stats(images: int, jobs: list[Job], clock: StepCallback, t_prepared: float) -> BatchStats:
    """Steps count every pass's; the denoising seconds and the per-step time are the base pass's (the batch policy
    is keyed on the base model)."""
    steps = max(j.steps_done for j in jobs)
    denoise = (clock.last or t_prepared) - t_prepared
    per_step = (clock.last - clock.first) / (clock.count - 1) if clock.count > 1 else denoise
    return BatchStats(images, steps, denoise, per_step)
