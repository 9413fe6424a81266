"""Turns protobuf requests into validated frozen requests, and internal events back into protobuf."""

from __future__ import annotations

import math
from typing import TypeVar, cast

import numpy as np
from PIL import Image

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.status import FieldViolation
from service import imaging, schedulers
from service.requests import (
    Event,
    GenerationRequest,
    InpaintArea,
    InpaintSpec,
    OutputSpec,
    PreviewMode,
    PreviewSpec,
    Progress,
    Queued,
    Result,
    Started,
    Task,
)
from service.settings import Settings


class InvalidRequest(ValueError):
    """The request broke one or more rules; each violation names the field and the rule."""

    def __init__(self, violations: list[FieldViolation]):
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = tuple(violations)


_FORMAT_NAMES = {pb.IMAGE_FORMAT_PNG: "png", pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_WEBP: "webp"}
_FORMAT_ENUM = {v: k for k, v in _FORMAT_NAMES.items()}
_PREVIEW_MODES = {
    pb.PREVIEW_MODE_UNSPECIFIED: PreviewMode.NONE,
    pb.PREVIEW_MODE_NONE: PreviewMode.NONE,
    pb.PREVIEW_MODE_LATENT_RGB: PreviewMode.LATENT_RGB,
    pb.PREVIEW_MODE_FULL_VAE: PreviewMode.FULL_VAE,
}
_AREAS = {
    pb.INPAINT_AREA_UNSPECIFIED: InpaintArea.WHOLE_IMAGE,
    pb.INPAINT_AREA_WHOLE_IMAGE: InpaintArea.WHOLE_IMAGE,
    pb.INPAINT_AREA_MASK_ONLY: InpaintArea.MASK_ONLY,
}
_AREA_ENUM = {InpaintArea.WHOLE_IMAGE: pb.INPAINT_AREA_WHOLE_IMAGE, InpaintArea.MASK_ONLY: pb.INPAINT_AREA_MASK_ONLY}
_TASK_ENUM = {Task.GENERATE: pb.TASK_GENERATE, Task.EDIT: pb.TASK_EDIT, Task.INPAINT: pb.TASK_INPAINT}


def scheduler_from_proto(value: int) -> str | None:
    """The internal scheduler name ("" for the model's own), or None for an unknown enum value."""
    if value == pb.SCHEDULER_UNSPECIFIED:
        return ""
    try:
        name = pb.Scheduler.Name(cast("pb.Scheduler.ValueType", value)).removeprefix("SCHEDULER_")
    except ValueError:
        return None
    return name if name in schedulers.SCHEDULERS else None


def scheduler_to_proto(name: str) -> pb.Scheduler.ValueType:
    return pb.Scheduler.Value("SCHEDULER_" + name) if name else pb.SCHEDULER_UNSPECIFIED


def decimal32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: proto `float` fields arrive as float32, so 0.35
    arrives as 0.3499999940, and diffusers' `int(steps * strength)` would lose a step against a caller who meant
    0.35 (as a direct diffusers call with 0.35 would not)."""
    return float(str(np.float32(value))) if math.isfinite(value) else value


class _Checker:
    """Collects violations while reading fields."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.violations: list[FieldViolation] = []

    def bad(self, field: str, rule: str) -> None:
        self.violations.append(FieldViolation(field, rule))

    def text(self, field: str, value: str, limit: int) -> str:
        if len(value) > limit:
            self.bad(field, f"must be at most {limit} characters; got {len(value)}")
        return value

    def size(self, field: str, value: int) -> int:
        if value == 0:
            return 0
        if value % 8:
            self.bad(field, f"must be a multiple of 8; got {value}")
        elif not self.s.min_size <= value <= self.s.max_size:
            self.bad(field, f"must be between {self.s.min_size} and {self.s.max_size} pixels; got {value}")
        return value

    def int_range(self, field: str, value: int, low: int, high: int) -> int:
        if not low <= value <= high:
            self.bad(field, f"must be between {low} and {high}; got {value}")
        return value

    def real_range(self, field: str, value: float, low: float, high: float, low_open: bool = False) -> float:
        value = decimal32(value)
        ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
        if not ok:
            bracket = "(" if low_open else "["
            self.bad(field, f"must be in {bracket}{low:g}, {high:g}]; got {value:g}")
        return value

    def image(self, field: str, data: bytes, mode: str) -> Image.Image | None:
        try:
            return imaging.decode_image(
                data, max_bytes=self.s.max_image_bytes, max_pixels=self.s.max_input_pixels, mode=mode
            )
        except imaging.ImageDecodeError as exc:
            self.bad(field, str(exc))
            return None


def _preview(c: _Checker, p: pb.PreviewOptions) -> PreviewSpec:
    mode = _PREVIEW_MODES.get(p.mode)
    if mode is None:
        c.bad("params.preview.mode", f"unknown preview mode {p.mode}")
        mode = PreviewMode.NONE
    every = c.int_range("params.preview.every_n_steps", p.every_n_steps, 0, 1000) or 1
    edge = p.max_edge
    if edge and not 16 <= edge <= 2048:
        c.bad("params.preview.max_edge", f"must be 0 or between 16 and 2048 pixels; got {edge}")
    fmt = "jpeg"
    if p.format in (pb.IMAGE_FORMAT_PNG,):
        c.bad("params.preview.format", "must be JPEG or WebP; PNG previews are too slow to encode")
    elif p.format != pb.IMAGE_FORMAT_UNSPECIFIED:
        fmt = _FORMAT_NAMES.get(p.format, "")
        if not fmt:
            c.bad("params.preview.format", f"unknown image format {p.format}")
    quality = c.int_range("params.preview.quality", p.quality, 0, 100) or 75
    return PreviewSpec(mode=mode, every_n_steps=every, max_edge=edge, format=fmt or "jpeg", quality=quality)


def _output(c: _Checker, o: pb.OutputOptions) -> OutputSpec:
    fmt = "png"
    if o.format != pb.IMAGE_FORMAT_UNSPECIFIED:
        fmt = _FORMAT_NAMES.get(o.format, "")
        if not fmt:
            c.bad("params.output.format", f"unknown image format {o.format}")
    quality = c.int_range("params.output.quality", o.quality, 0, 100) or 90
    embed = o.embed_parameters if o.HasField("embed_parameters") else True
    return OutputSpec(format=fmt or "png", quality=quality, embed_parameters=embed)


def _params(c: _Checker, task: Task, p: pb.GenerationParams) -> dict[str, object]:
    s = c.s
    scheduler = scheduler_from_proto(p.scheduler)
    if scheduler is None:
        c.bad("params.scheduler", f"unknown scheduler {p.scheduler}")
    guidance = None
    if p.HasField("guidance_scale"):
        guidance = c.real_range("params.guidance_scale", p.guidance_scale, 0.0, 50.0)
    request_id = p.request_id
    if len(request_id) > 128 or not all(32 <= ord(ch) < 127 for ch in request_id):
        c.bad("params.request_id", "must be at most 128 printable ASCII characters")
    if not math.isfinite(p.max_queue_seconds) or not 0 <= p.max_queue_seconds <= 86400:
        c.bad("params.max_queue_seconds", f"must be between 0 and 86400 seconds; got {p.max_queue_seconds:g}")
    if len(p.model) > 200:
        c.bad("params.model", "must be at most 200 characters")
    return {
        "task": task,
        "model": p.model,
        "prompt": c.text("params.prompt", p.prompt, s.max_prompt_chars),
        "negative_prompt": c.text("params.negative_prompt", p.negative_prompt, s.max_prompt_chars),
        "width": c.size("params.width", p.width),
        "height": c.size("params.height", p.height),
        "steps": c.int_range("params.steps", p.steps, 0, s.max_steps),
        "guidance_scale": guidance,
        "scheduler": scheduler or "",
        "seed": p.seed if p.HasField("seed") else None,
        "num_images": c.int_range("params.num_images", p.num_images, 0, s.max_images) or 1,
        "clip_skip": c.int_range("params.clip_skip", p.clip_skip, 0, 48),
        "preview": _preview(c, p.preview),
        "output": _output(c, p.output),
        "request_id": request_id,
        "max_queue_seconds": p.max_queue_seconds,
    }


def _input_image(c: _Checker, data: bytes, p: pb.GenerationParams, whole: bool) -> Image.Image | None:
    img = c.image("image", data, "RGB")
    if img is None or not whole:
        return img
    for axis, size, asked in (("width", img.width, p.width), ("height", img.height, p.height)):
        if size % 8 or not c.s.min_size <= size <= c.s.max_size:
            c.bad("image", f"{axis} must be a multiple of 8 between {c.s.min_size} and {c.s.max_size}; got {size}")
        elif asked and asked != size:
            c.bad(f"params.{axis}", f"must be 0 or the input image's {axis} ({size}); got {asked}")
    return img


def _strength(c: _Checker, msg: pb.EditRequest | pb.InpaintRequest) -> float | None:
    if not msg.HasField("strength"):
        return None
    return c.real_range("strength", msg.strength, 0.0, 1.0, low_open=True)


def _done(c: _Checker, **kwargs: object) -> GenerationRequest:
    if c.violations:
        raise InvalidRequest(c.violations)
    return GenerationRequest(**kwargs)  # type: ignore[arg-type]


def generate_request(msg: pb.GenerateRequest, settings: Settings) -> GenerationRequest:
    """Validates a GenerateRequest; raises InvalidRequest listing every bad field."""
    c = _Checker(settings)
    return _done(c, **_params(c, Task.GENERATE, msg.params))


def edit_request(msg: pb.EditRequest, settings: Settings) -> GenerationRequest:
    """Validates an EditRequest; raises InvalidRequest listing every bad field."""
    c = _Checker(settings)
    fields = _params(c, Task.EDIT, msg.params)
    image = _input_image(c, msg.image, msg.params, whole=True)
    return _done(c, **fields, image=image, strength=_strength(c, msg))


def inpaint_request(msg: pb.InpaintRequest, settings: Settings) -> GenerationRequest:
    """Validates an InpaintRequest; raises InvalidRequest listing every bad field."""
    c = _Checker(settings)
    fields = _params(c, Task.INPAINT, msg.params)
    area = _AREAS.get(msg.area)
    if area is None:
        c.bad("area", f"unknown inpaint area {msg.area}")
        area = InpaintArea.WHOLE_IMAGE
    image = _input_image(c, msg.image, msg.params, whole=area is InpaintArea.WHOLE_IMAGE)
    mask = None
    if not msg.mask:
        c.bad("mask", "is required for Inpaint (white = repaint, black = keep)")
    else:
        mask = c.image("mask", msg.mask, "L")
    if image is not None and mask is not None:
        if mask.size != image.size:
            c.bad(
                "mask", f"must be the same size as image ({image.width}x{image.height}); got {mask.width}x{mask.height}"
            )
        elif not imaging.binary_mask(mask, msg.invert_mask).getbbox():
            c.bad("mask", "has nothing to repaint: no pixel is white (>= 128) after invert_mask")
    blur = c.int_range("mask_blur", msg.mask_blur, 0, 64)
    padding = msg.mask_padding if msg.HasField("mask_padding") else 32
    c.int_range("mask_padding", padding, 0, 1024)
    strength = _strength(c, msg)
    if c.violations:
        raise InvalidRequest(c.violations)
    assert mask is not None
    spec = InpaintSpec(
        mask=mask,
        mask_blur=blur,
        invert_mask=msg.invert_mask,
        area=area,
        mask_padding=padding,
        preserve_unmasked=msg.preserve_unmasked,
    )
    return _done(c, **fields, image=image, strength=strength, inpaint=spec)


R = TypeVar("R", pb.GenerateResponse, pb.EditResponse, pb.InpaintResponse)


def event_to_proto(event: Event, cls: type[R]) -> R:
    """One stream event as the RPC's response message (terminal failures are not events)."""
    if isinstance(event, Queued):
        return cls(queued=pb.QueuedEvent(position=event.position))
    if isinstance(event, Started):
        return cls(
            started=pb.StartedEvent(
                seeds=list(event.seeds),
                model=event.model,
                model_revision=event.model_revision,
                request_id=event.request_id,
                queue_seconds=event.queue_seconds,
                batch_size=event.batch_size,
                model_variant=event.model_variant,
                dtype=event.dtype,
            )
        )
    if isinstance(event, Progress):
        return cls(
            progress=pb.ProgressEvent(
                step=event.step,
                total_steps=event.total_steps,
                previews=[
                    pb.Preview(
                        index=p.index, data=p.data, format=_FORMAT_ENUM[p.format], width=p.width, height=p.height
                    )
                    for p in event.previews
                ],
            )
        )
    if isinstance(event, Result):
        return cls(result=result_to_proto(event))
    raise TypeError(f"not a stream event: {event!r}")


def result_to_proto(event: Result) -> pb.ResultEvent:
    r = event.resolved
    req = r.request
    inpaint = req.inpaint
    t = event.timings
    return pb.ResultEvent(
        images=[
            pb.Image(
                index=i.index, data=i.data, format=_FORMAT_ENUM[i.format], width=i.width, height=i.height, seed=i.seed
            )
            for i in event.images
        ],
        parameters=pb.ResolvedParameters(
            task=_TASK_ENUM[r.task],
            model=r.model,
            model_revision=r.model_revision,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            scheduler=scheduler_to_proto(r.scheduler_name),
            seed=r.seeds[0],
            num_images=r.num_images,
            clip_skip=req.clip_skip,
            strength=r.strength,
            mask_blur=inpaint.mask_blur if inpaint else 0,
            area=_AREA_ENUM[inpaint.area] if inpaint else pb.INPAINT_AREA_UNSPECIFIED,
            mask_padding=inpaint.mask_padding if inpaint else 0,
            preserve_unmasked=inpaint.preserve_unmasked if inpaint else False,
            invert_mask=inpaint.invert_mask if inpaint else False,
            scheduler_class=r.scheduler_class,
            device=r.device,
            dtype=r.dtype,
            model_variant=r.variant,
        ),
        timings=pb.Timings(
            queue_seconds=t.queue,
            prepare_seconds=t.prepare,
            denoise_seconds=t.denoise,
            decode_seconds=t.decode,
            encode_seconds=t.encode,
            total_seconds=t.total,
            preview_seconds=t.preview,
        ),
        request_id=r.request_id,
    )
