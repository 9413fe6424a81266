"""Runs one diffusers pipeline call for a batch of compatible jobs and posts their events."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from PIL import Image

from service import imaging, previews, schedulers
from service.jobs import Job
from service.models import LoadedModel
from service.prompt_cache import PromptCache, cache_key
from service.requests import (
    GenerationRequest,
    InpaintArea,
    PreviewMode,
    Progress,
    Result,
    ResultImage,
    Task,
    Timings,
)


class StopDenoising(Exception):
    """Raised from the step callback when every member of the batch has stopped."""


def _prepare_inputs(job: Job) -> tuple[list[Image.Image], list[Image.Image]]:
    """Per-image init images and masks (repeated for num_images) for Edit and Inpaint."""
    req = job.resolved.request
    n = job.resolved.num_images
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    if req.image is not None:
        images = [req.image] * n
    if req.inpaint is not None:
        hard = imaging.binary_mask(req.inpaint.mask, req.inpaint.invert_mask)
        masks = [imaging.blur_mask(hard, req.inpaint.mask_blur)] * n
    return images, masks


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What one pipeline call did: images, denoising steps finished, and the denoising loop's seconds."""

    images: int
    steps: int
    denoise_seconds: float
    # Seconds per step between the first and last step callbacks (setup excluded); 0 when unknown.
    step_seconds: float


def skip_layers(pipe: Any, prompt: str, clip_skip: int, device: Any) -> torch.Tensor:
    """The prompt's embeddings from the text encoder's hidden state `clip_skip` layers before the last, through the
    final layer norm: what diffusers' `encode_prompt(clip_skip=...)` computes. Done here because diffusers 0.42
    reaches the norm through `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
    Like diffusers, only the prompt is skipped; the negative prompt uses the last layer."""
    encoder = pipe.text_encoder
    ids = pipe.tokenizer(
        prompt,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return norm(hidden).to(dtype=encoder.dtype, device=device)  # type: ignore[no-any-return]


def encode_prompts(
    pipe: Any, model: LoadedModel, jobs: list[Job], cfg: bool, cache: PromptCache | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings for every image of every job, in batch order (through the cache when given)."""
    pos: list[torch.Tensor] = []
    neg: list[torch.Tensor] = []
    for job in jobs:
        req = job.resolved.request

        def compute(req: GenerationRequest = req) -> tuple[torch.Tensor, torch.Tensor | None]:
            skipped = skip_layers(pipe, req.prompt, req.clip_skip, model.choice.device) if req.clip_skip else None
            p, n = pipe.encode_prompt(
                None if skipped is not None else req.prompt,
                model.choice.device,
                1,
                cfg,
                req.negative_prompt if cfg else None,
                prompt_embeds=skipped,
            )
            return p, n

        if cache is None:
            p, n = compute()
        else:
            key = cache_key(job.resolved.identity, req.prompt, req.negative_prompt, req.clip_skip, cfg)
            p, n = cache.get(key, compute)
        count = job.resolved.num_images
        pos.append(p.repeat(count, 1, 1))
        if n is not None:
            neg.append(n.repeat(count, 1, 1))
    return torch.cat(pos), (torch.cat(neg) if neg else None)


def run_batch(model: LoadedModel, jobs: list[Job], cache: PromptCache | None = None) -> BatchStats:
    """Runs `jobs` (equal batch keys) as one pipeline call; posts progress and results, or raises."""
    first = jobs[0].resolved
    t_start = time.perf_counter()
    scheduler = schedulers.build(first.scheduler, model.entry.scheduler_config)
    pipe = model.pipeline(first.task, scheduler)
    cfg = first.guidance_scale > 1.0
    spans: list[tuple[Job, int, int]] = []
    offset = 0
    for job in jobs:
        spans.append((job, offset, job.resolved.num_images))
        offset += job.resolved.num_images
    generators = [torch.Generator("cpu").manual_seed(s) for job in jobs for s in job.resolved.seeds]
    with torch.inference_mode():
        prompt_embeds, negative_embeds = encode_prompts(pipe, model, jobs, cfg, cache)
    kwargs: dict[str, Any] = {
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "generator": generators,
        "output_type": "pil",
    }
    init_images: list[Image.Image] = []
    if first.task is Task.GENERATE:
        kwargs.update(height=first.height, width=first.width)
    else:
        masks: list[Image.Image] = []
        for job in jobs:
            imgs, msks = _prepare_inputs(job)
            init_images += imgs
            masks += msks
        kwargs.update(image=init_images, strength=first.strength)
        if first.task is Task.INPAINT:
            spec = first.request.inpaint
            assert spec is not None
            kwargs.update(mask_image=masks, height=first.height, width=first.width)
            if spec.area is InpaintArea.MASK_ONLY:
                kwargs["padding_mask_crop"] = spec.mask_padding
                # diffusers checks for single PIL images when cropping; cropped jobs never share a call.
                kwargs.update(image=init_images[0], mask_image=masks[0], num_images_per_prompt=len(generators))
                kwargs["prompt_embeds"] = prompt_embeds[:1]
                kwargs["negative_prompt_embeds"] = None if negative_embeds is None else negative_embeds[:1]
    t_prepared = time.perf_counter()
    marks = {"first": 0.0, "last": 0.0, "preview": 0.0}

    def on_step_end(p: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        live = []
        for job, _, _ in spans:
            if job.finished:
                continue
            if job.should_stop(now):
                job.post(job.stop_event(now))
            else:
                live.append(job)
        if not live:
            raise StopDenoising
        step, total = i + 1, int(p.num_timesteps)
        latents = cb_kwargs["latents"]
        t0 = time.perf_counter()
        for job, start, count in spans:
            if job.finished:
                continue
            spec = job.resolved.request.preview
            shots: tuple[Any, ...] = ()
            due = step % spec.every_n_steps == 0 or step == total
            if spec.mode is not PreviewMode.NONE and due:
                r = job.resolved
                shots = previews.render(model, latents[start : start + count], spec, max(r.width, r.height))
            job.steps_done = step
            job.post(Progress(step=step, total_steps=total, previews=shots))
        t1 = time.perf_counter()
        marks["preview"] += t1 - t0
        marks["first"] = marks["first"] or t1
        marks["last"] = t1
        return cb_kwargs

    try:
        with torch.inference_mode():
            images: list[Image.Image] = pipe(**kwargs, callback_on_step_end=on_step_end).images
    except StopDenoising:
        return _stats(len(generators), jobs, marks, t_prepared)
    t_decoded = time.perf_counter()
    for job in jobs:
        job.decoded = True
    now = time.monotonic()
    for job, start, count in spans:
        if job.finished:
            continue
        if job.should_stop(now):
            job.post(job.stop_event(now))
            continue
        t_enc = time.perf_counter()
        results = _finish_images(job, images[start : start + count], init_images[start : start + count])
        t_done = time.perf_counter()
        queue_s = (job.started_at or job.enqueued_at) - job.enqueued_at
        timings = Timings(
            queue=queue_s,
            prepare=t_prepared - t_start,
            denoise=(marks["last"] or t_prepared) - t_prepared,
            decode=t_decoded - (marks["last"] or t_prepared),
            encode=t_done - t_enc,
            total=time.monotonic() - job.arrived_at,
            preview=marks["preview"],
        )
        job.post(Result(images=tuple(results), resolved=job.resolved, timings=timings))
    return _stats(len(generators), jobs, marks, t_prepared)


def _stats(images: int, jobs: list[Job], marks: dict[str, float], t_prepared: float) -> BatchStats:
    steps = max(j.steps_done for j in jobs)
    denoise = (marks["last"] or t_prepared) - t_prepared
    per_step = (marks["last"] - marks["first"]) / (steps - 1) if steps > 1 else denoise
    return BatchStats(images, steps, denoise, per_step)


def _finish_images(job: Job, images: list[Image.Image], init_images: list[Image.Image]) -> list[ResultImage]:
    """Applies preserve_unmasked, then encodes each image with its parameters."""
    r = job.resolved
    req = r.request
    out: list[ResultImage] = []
    for idx, img in enumerate(images):
        spec = req.inpaint
        if spec is not None and spec.preserve_unmasked and req.image is not None:
            hard = imaging.binary_mask(spec.mask, spec.invert_mask)
            soft = imaging.blur_mask(hard, spec.mask_blur)
            img = imaging.composite_unmasked(req.image, img, hard, soft)
        seed = r.seeds[idx]
        params = parameters_dict(job, seed) if req.output.embed_parameters else None
        data = imaging.encode_image(img, req.output.format, req.output.quality, params, a1111_text(job, seed))
        out.append(
            ResultImage(index=idx, data=data, format=req.output.format, width=img.width, height=img.height, seed=seed)
        )
    return out


def parameters_dict(job: Job, seed: int) -> dict[str, object]:
    """The resolved parameters of one image, as embedded in its file."""
    r = job.resolved
    req = r.request
    d: dict[str, object] = {
        "task": r.task.value,
        "model": r.model,
        "model_revision": r.model_revision,
        "model_variant": r.variant,
        "dtype": r.dtype,
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": r.width,
        "height": r.height,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "scheduler": r.scheduler_name,
        "seed": seed,
        "clip_skip": req.clip_skip,
    }
    if r.task is not Task.GENERATE:
        d["strength"] = r.strength
    if req.inpaint is not None:
        d.update(
            mask_blur=req.inpaint.mask_blur,
            invert_mask=req.inpaint.invert_mask,
            area=req.inpaint.area.value,
            mask_padding=req.inpaint.mask_padding,
            preserve_unmasked=req.inpaint.preserve_unmasked,
        )
    return d


def a1111_text(job: Job, seed: int) -> str:
    """The A1111-style `parameters` text that image browsers read."""
    r = job.resolved
    req = r.request
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    settings = (
        f"Steps: {r.steps}, Sampler: {r.scheduler_name}, CFG scale: {r.guidance_scale:g}, Seed: {seed}, "
        f"Size: {r.width}x{r.height}, Model: {r.model}, Model hash: {r.model_revision[:10]}"
    )
    if r.task is not Task.GENERATE:
        settings += f", Denoising strength: {r.strength:g}"
    if req.clip_skip:
        settings += f", Clip skip: {req.clip_skip + 1}"
    lines.append(settings)
    return "\n".join(lines)
