"""Binds a validated request to a model and fills in the model-dependent defaults."""

from __future__ import annotations

import secrets
import uuid

from PIL import Image

from sdserve_core.status import FieldViolation
from service import imaging, schedulers
from service.device import DeviceChoice
from service.models import ModelEntry
from service.requests import GenerationRequest, InpaintArea, InpaintSpec, ResolvedRequest, Task

_U64 = 1 << 64


class InvalidForModel(ValueError):
    """Rules that depend on the model were broken."""

    def __init__(self, violations: list[FieldViolation]):
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = tuple(violations)


def crop_region(mask: Image.Image, spec: InpaintSpec, width: int, height: int) -> tuple[int, int, int, int]:
    """The box diffusers cuts out for `padding_mask_crop`: around the (blurred) mask, grown by the padding, then
    widened toward width:height as far as the image allows."""
    from diffusers.image_processor import VaeImageProcessor

    soft = imaging.blur_mask(imaging.binary_mask(mask, spec.invert_mask), spec.mask_blur)
    box = VaeImageProcessor.get_crop_region(soft, width, height, pad=spec.mask_padding)
    return (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


def crop_problem(image: Image.Image, mask: Image.Image, spec: InpaintSpec, width: int, height: int) -> str:
    """Why MASK_ONLY cannot process this geometry ("" when it can): the cut-out box is scaled to fit width x height
    keeping its aspect ratio, and a box far thinner than width:height (a thin image leaves no room to widen it)
    scales to less than one pixel."""
    x1, y1, x2, y2 = crop_region(mask, spec, width, height)
    box_w, box_h = x2 - x1, y2 - y1
    if box_w > 0 and box_h > 0:
        fit_w = width if width / height < box_w / box_h else box_w * height // box_h
        fit_h = height if width / height >= box_w / box_h else box_h * width // box_w
        if fit_w >= 1 and fit_h >= 1:
            return ""
    return (
        f"MASK_ONLY cannot process this image: the region around the mask is {box_w}x{box_h} px "
        f"(image {image.width}x{image.height}, mask_padding {spec.mask_padding}), which scaled to fit {width}x{height} "
        "is less than one pixel across; use INPAINT_AREA_WHOLE_IMAGE, or a width:height closer to the region's"
    )


def resolve(req: GenerationRequest, entry: ModelEntry, choice: DeviceChoice) -> ResolvedRequest:
    """Fills width, height, steps, guidance, scheduler, seeds and strength; checks model-dependent rules."""
    violations: list[FieldViolation] = []
    if req.clip_skip >= entry.text_encoder_layers:
        violations.append(
            FieldViolation(
                "params.clip_skip",
                f"must be below the text encoder's depth ({entry.text_encoder_layers} layers) for model "
                f"{entry.name!r}; got {req.clip_skip}",
            )
        )
    width, height = req.width, req.height
    if req.image is not None and not (
        req.task is Task.INPAINT and req.inpaint is not None and req.inpaint.area is InpaintArea.MASK_ONLY
    ):
        width = width or req.image.width
        height = height or req.image.height
    width = width or entry.default_width
    height = height or entry.default_height
    strength = 0.0
    if req.task is Task.EDIT:
        strength = 0.8 if req.strength is None else req.strength
    elif req.task is Task.INPAINT:
        strength = 1.0 if req.strength is None else req.strength
    steps = req.steps or entry.default_steps
    limit = schedulers.max_steps(req.scheduler, entry.scheduler_config)
    if steps > limit:
        shown = req.scheduler or schedulers.native_name(entry.scheduler_config)
        violations.append(
            FieldViolation(
                "params.steps", f"must be at most {limit} with scheduler {shown} for model {entry.name!r}; got {steps}"
            )
        )
    if req.inpaint is not None and req.image is not None and req.inpaint.area is InpaintArea.MASK_ONLY:
        problem = crop_problem(req.image, req.inpaint.mask, req.inpaint, width, height)
        if problem:
            violations.append(FieldViolation("area", problem))
    if req.task is not Task.GENERATE and int(steps * strength) < 1:
        violations.append(
            FieldViolation(
                "params.steps",
                f"steps x strength must be at least 1 so one denoising step runs; got {steps} x {strength:g}",
            )
        )
    if violations:
        raise InvalidForModel(violations)
    seed = secrets.randbits(63) if req.seed is None else req.seed
    return ResolvedRequest(
        request=req,
        identity=entry.identity,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=entry.default_guidance_scale if req.guidance_scale is None else req.guidance_scale,
        scheduler=req.scheduler,
        scheduler_name=req.scheduler or schedulers.native_name(entry.scheduler_config),
        scheduler_class=schedulers.class_name(req.scheduler, entry.scheduler_config),
        seeds=tuple((seed + i) % _U64 for i in range(req.num_images)),
        strength=strength,
        request_id=req.request_id or uuid.uuid4().hex,
        device=choice.type,
        dtype=choice.dtype_name,
    )
