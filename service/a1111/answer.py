"""The body of a txt2img / img2img answer: base64 images, the request echoed as `parameters`, and A1111's `info`
JSON string (the fields of its Processed.js(), plus sdserve's request ids and whether /interrupt stopped it)."""

from __future__ import annotations

import json
from typing import Any

from sdserve.v1 import diffusion_pb2 as pb
from service.a1111 import catalog, images, infotext
from service.a1111.runner import Outcome
from service.a1111.schemas import Img2ImgBody, ProcessingBody
from service.a1111.tracking import Job
from service.a1111.translate import Prepared
from service.convert import VERSION


def parameters(body: ProcessingBody) -> dict[str, Any]:
    """The request as read (A1111's `parameters`): every declared field with its default filled in; the input
    images only when `include_init_images` asks for them."""
    echo = body.model_dump(include=set(type(body).model_fields))
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        echo["init_images"] = echo["mask"] = None
    return echo


def _texts(result_images: list[pb.Image]) -> list[str]:
    texts = []
    for img in result_images:
        try:
            texts.append(infotext.read(img.data)[0])
        except infotext.NotAnImage:
            texts.append("")
    return texts


def info(body: ProcessingBody, prepared: Prepared, out: Outcome, job: Job, inpainting: bool) -> str:
    """A1111's `info` string for what ran."""
    result_images = [img for r in out.results for img in r.images]
    ran = out.results[0].parameters if out.results else None
    seeds = [img.seed for img in result_images] or (list(out.started.seeds) if out.started else [prepared.seed])
    model = ran.model if ran else (out.started.model if out.started else "")
    revision = ran.model_revision if ran else (out.started.model_revision if out.started else "")
    count = max(1, len(result_images))
    obj = {
        "prompt": body.prompt or "",
        "all_prompts": [body.prompt or ""] * count,
        "negative_prompt": body.negative_prompt or "",
        "all_negative_prompts": [body.negative_prompt or ""] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1 if body.subseed is None else body.subseed,
        "all_subseeds": [-1 if body.subseed is None else body.subseed] * len(seeds),
        "subseed_strength": 0,
        "width": ran.width if ran else body.width,
        "height": ran.height if ran else body.height,
        "sampler_name": prepared.choice.sampler.name,
        "scheduler": prepared.choice.schedule,
        "cfg_scale": 7.0 if body.cfg_scale is None else body.cfg_scale,
        "steps": ran.steps if ran else body.steps,
        "batch_size": body.batch_size or 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": catalog.short_hash(revision),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": body.denoising_strength,
        "extra_generation_params": {"Schedule type": prepared.choice.schedule},
        "index_of_first_image": 0,
        "infotexts": _texts(result_images),
        "styles": body.styles or [],
        "job_timestamp": job.timestamp,
        "clip_skip": (ran.clip_skip if ran else 0) + 1,
        "is_using_inpainting_conditioning": inpainting,
        "version": f"sdserve-{VERSION}",
        "request_ids": [r.request_id for r in out.results],
        "interrupted": out.interrupted,
    }
    return json.dumps(obj)


def body_of(body: ProcessingBody, prepared: Prepared, out: Outcome, job: Job, inpainting: bool) -> dict[str, Any]:
    """The whole answer: images (none when send_images is false), parameters and info."""
    send = body.send_images is not False
    found = [images.encode_b64(img.data) for r in out.results for img in r.images] if send else []
    return {"images": found, "parameters": parameters(body), "info": info(body, prepared, out, job, inpainting)}
