"""Binds a validated request to a model and fills in the model-dependent defaults."""

from __future__ import annotations

import secrets
import uuid

from service import schedulers
from service.device import DeviceChoice
from service.models import ModelEntry
from service.requests import FieldViolation, GenerationRequest, InpaintArea, ResolvedRequest, Task

_U64 = 1 << 64


class InvalidForModel(ValueError):
    """Rules that depend on the model were broken."""

    def __init__(self, violations: list[FieldViolation]):
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = tuple(violations)


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
        model=entry.name,
        model_revision=entry.revision,
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
