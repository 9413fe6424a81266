"""Before and after the pipeline: a job's init images and masks, and its finished images with their parameters."""

from __future__ import annotations

import dataclasses

from PIL import Image

from service import imaging
from service.jobs import Job
from service.requests import AdapterUse, RefinerMode, ResultImage, Task
from service.sampler_names import AUTOMATIC, a1111_names


def prepare_inputs(job: Job) -> tuple[list[Image.Image], list[Image.Image]]:
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


def finish_images(job: Job, images: list[Image.Image]) -> list[ResultImage]:
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
    d.update(_family_dict(job))
    if r.adapters:
        d["adapters"] = [
            {
                "name": u.name,
                "kind": u.kind,
                "scale": u.scale,
                "sha256": u.sha256,
                **({"token": u.token} if u.token else {}),
            }
            for u in r.adapters
        ]
    return d


def _family_dict(job: Job) -> dict[str, object]:
    """The family-only parameters (SDXL's second prompts, micro-conditioning and refiner), when the model has them."""
    r = job.resolved
    req = r.request
    d: dict[str, object] = {}
    if r.conditioning is not None:
        d.update(prompt_2=req.prompt_2, negative_prompt_2=req.negative_prompt_2)
        d["conditioning"] = dataclasses.asdict(r.conditioning)
    if r.refiner is not None:
        ref = r.refiner
        handoff = ref.mode is RefinerMode.LATENT_HANDOFF
        d["refiner"] = {
            "model": ref.identity.model,
            "model_revision": ref.identity.revision,
            "model_variant": ref.identity.variant,
            "mode": ref.mode.value,
            **({"switch_at": ref.switch_at} if handoff else {"strength": ref.strength}),
        }
    return d


def a1111_text(job: Job, seed: int) -> str:
    """The A1111-style `parameters` text that image browsers read."""
    r = job.resolved
    req = r.request
    # A1111 keeps its <lora:NAME:SCALE> tags in the prompt it writes; so do we, for tools that re-run it.
    tags = "".join(f" <lora:{u.name}:{u.scale:g}>" for u in r.adapters if u.lora)
    lines = [req.prompt + tags]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    # A1111's own sampler names ("Euler a", "DPM++ 2M" with "Schedule type: Karras"), which its tools parse.
    sampler, schedule = a1111_names(r.scheduler_name)
    schedule_item = f", Schedule type: {schedule}" if schedule != AUTOMATIC else ""
    settings = (
        f"Steps: {r.steps}, Sampler: {sampler}{schedule_item}, CFG scale: {r.guidance_scale:g}, Seed: {seed}, "
        f"Size: {r.width}x{r.height}, Model: {r.model}, Model hash: {r.model_revision[:10]}"
    )
    if r.task is not Task.GENERATE:
        settings += f", Denoising strength: {r.strength:g}"
    if req.clip_skip:
        settings += f", Clip skip: {req.clip_skip + 1}"
    if r.refiner is not None:
        # A1111's own keys for its SDXL refiner (its switch is the fraction of steps run by the base model).
        settings += f", Refiner: {r.refiner.identity.model}"
        if r.refiner.mode is RefinerMode.LATENT_HANDOFF:
            settings += f", Refiner switch at: {r.refiner.switch_at:g}"
    settings += _adapter_hashes(r.adapters)
    lines.append(settings)
    return "\n".join(lines)


def _adapter_hashes(uses: tuple[AdapterUse, ...]) -> str:
    """A1111's `Lora hashes` and `TI hashes` keys (name: first 12 hex digits of the file's sha256)."""
    out = ""
    for key, lora in (("Lora hashes", True), ("TI hashes", False)):
        found = [f"{u.name}: {u.sha256[:12]}" for u in uses if u.lora == lora]
        if found:
            out += f', {key}: "{", ".join(found)}"'
    return out
