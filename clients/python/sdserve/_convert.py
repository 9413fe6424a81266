"""Client-side conversion between keyword options, protobuf messages and the typed dataclasses."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from sdserve.types import (
    EditOptions,
    Event,
    GeneratedImage,
    GenerationOptions,
    InpaintOptions,
    ModelInfo,
    PreviewImage,
    Progress,
    Queued,
    Result,
    Started,
    Timings,
)
from sdserve.v1 import diffusion_pb2 as pb

_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}
_FORMAT_NAMES = {v: k for k, v in _FORMATS.items()}
_PREVIEWS = {
    "none": pb.PREVIEW_MODE_NONE,
    "latent_rgb": pb.PREVIEW_MODE_LATENT_RGB,
    "full_vae": pb.PREVIEW_MODE_FULL_VAE,
}
AREAS = {"whole_image": pb.INPAINT_AREA_WHOLE_IMAGE, "mask_only": pb.INPAINT_AREA_MASK_ONLY}

_KNOWN = set(GenerationOptions.__annotations__)


def params(prompt: str, options: GenerationOptions) -> pb.GenerationParams:
    """Builds GenerationParams from keyword options; unknown keys raise TypeError."""
    unknown = set(options) - _KNOWN
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    o: dict[str, Any] = dict(options)
    p = pb.GenerationParams(
        prompt=prompt,
        model=o.get("model", ""),
        negative_prompt=o.get("negative_prompt", ""),
        width=o.get("width", 0),
        height=o.get("height", 0),
        steps=o.get("steps", 0),
        num_images=o.get("num_images", 0),
        clip_skip=o.get("clip_skip", 0),
        request_id=o.get("request_id", ""),
        max_queue_seconds=o.get("max_queue_seconds", 0.0),
    )
    if o.get("guidance_scale") is not None:
        p.guidance_scale = o["guidance_scale"]
    if o.get("seed") is not None:
        p.seed = o["seed"]
    if o.get("scheduler"):
        p.scheduler = pb.Scheduler.Value("SCHEDULER_" + str(o["scheduler"]).upper())
    if o.get("preview"):
        p.preview.mode = _PREVIEWS[o["preview"]]
        p.preview.every_n_steps = o.get("preview_every", 0)
        p.preview.max_edge = o.get("preview_max_edge", 0)
        p.preview.quality = o.get("preview_quality", 0)
        if o.get("preview_format"):
            p.preview.format = _FORMATS[o["preview_format"]]
    if o.get("output_format"):
        p.output.format = _FORMATS[o["output_format"]]
    p.output.quality = o.get("output_quality", 0)
    if o.get("embed_parameters") is not None:
        p.output.embed_parameters = o["embed_parameters"]
    return p


def event(msg: pb.GenerateResponse | pb.EditResponse | pb.InpaintResponse) -> Event:
    """A stream message as a typed event."""
    kind = msg.WhichOneof("event")
    if kind == "queued":
        return Queued(position=msg.queued.position)
    if kind == "started":
        s = msg.started
        return Started(
            seeds=tuple(s.seeds),
            model=s.model,
            model_revision=s.model_revision,
            request_id=s.request_id,
            queue_seconds=s.queue_seconds,
            batch_size=s.batch_size,
            model_variant=s.model_variant,
            dtype=s.dtype,
        )
    if kind == "progress":
        p = msg.progress
        return Progress(
            step=p.step,
            total_steps=p.total_steps,
            previews=tuple(
                PreviewImage(i.index, i.data, _FORMAT_NAMES.get(i.format, "jpeg"), i.width, i.height)
                for i in p.previews
            ),
        )
    if kind == "result":
        r = msg.result
        t = r.timings
        parameters = json_format.MessageToDict(r.parameters, preserving_proto_field_name=True)
        return Result(
            images=tuple(
                GeneratedImage(i.index, i.data, _FORMAT_NAMES.get(i.format, "png"), i.width, i.height, i.seed)
                for i in r.images
            ),
            parameters=parameters,
            timings=Timings(
                t.queue_seconds,
                t.prepare_seconds,
                t.denoise_seconds,
                t.decode_seconds,
                t.encode_seconds,
                t.total_seconds,
                t.preview_seconds,
            ),
            request_id=r.request_id,
        )
    raise ValueError(f"unexpected stream message without an event: {msg!r}")


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name,
        revision=m.revision,
        state=pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower(),
        aliases=tuple(m.aliases),
        tasks=tuple(pb.Task.Name(t).removeprefix("TASK_").lower() for t in m.tasks),
        variant=m.variant,
        default_width=m.default_width,
        default_height=m.default_height,
        unet_in_channels=m.unet_in_channels,
        error=m.error,
        description=m.description,
        inpaint_model=m.inpaint_model,
    )


def edit_request(image: bytes, prompt: str, options: EditOptions) -> pb.EditRequest:
    o: dict[str, Any] = dict(options)
    strength = o.pop("strength", None)
    req = pb.EditRequest(params=params(prompt, o), image=image)  # type: ignore[arg-type]
    if strength is not None:
        req.strength = strength
    return req


_INPAINT_ONLY = ("strength", "mask_blur", "invert_mask", "area", "mask_padding", "preserve_unmasked")


def inpaint_request(image: bytes, mask: bytes, prompt: str, options: InpaintOptions) -> pb.InpaintRequest:
    o: dict[str, Any] = dict(options)
    own = {k: o.pop(k) for k in _INPAINT_ONLY if k in o}
    req = pb.InpaintRequest(
        params=params(prompt, o),  # type: ignore[arg-type]
        image=image,
        mask=mask,
        mask_blur=own.get("mask_blur", 0),
        invert_mask=own.get("invert_mask", False),
        area=AREAS[own.get("area", "whole_image")],
        preserve_unmasked=own.get("preserve_unmasked", False),
    )
    if own.get("strength") is not None:
        req.strength = own["strength"]
    if own.get("mask_padding") is not None:
        req.mask_padding = own["mask_padding"]
    return req
