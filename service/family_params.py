"""The request fields that only some model families take (SDXL's second-encoder prompts, micro-conditioning and
refiner pass): their field rules, read from protobuf (`read`), and the rules and defaults that depend on the model
that serves the request and on the refiner (`bind_family`)."""

from __future__ import annotations

from collections.abc import Callable

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.pipeline.call import Conditioning
from sdserve_core.status import FieldViolation
from service import schedulers
from service.models import ModelEntry
from service.requests import (
    ConditioningSpec,
    GenerationRequest,
    RefinerMode,
    RefinerSpec,
    ResolvedRefiner,
    Size,
    Task,
)

MAX_CONDITIONING_PIXELS = 16384
REFINER_MODES = {
    pb.REFINER_MODE_UNSPECIFIED: RefinerMode.LATENT_HANDOFF,
    pb.REFINER_MODE_LATENT_HANDOFF: RefinerMode.LATENT_HANDOFF,
    pb.REFINER_MODE_IMAGE: RefinerMode.IMAGE,
}
DEFAULT_SWITCH_AT = 0.8
DEFAULT_REFINER_STRENGTH = 0.3
DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5
SDXL = "sdxl"
# The request fields each family takes beyond the shared ones (GetServerInfo's FamilyInfo.fields).
FIELDS: dict[str, tuple[str, ...]] = {
    SDXL: ("params.prompt_2", "params.negative_prompt_2", "params.conditioning", "params.refiner"),
}
# (field, reader) for the range checks of the caller's validation (service.validation._Checker).
Bad = Callable[[str, str], None]
Real = Callable[[str, float, float, float, bool], float]


def _size(bad: Bad, field: str, name: str, cond: pb.MicroConditioning) -> Size | None:
    if not cond.HasField(name):  # type: ignore[arg-type]
        return None
    size: pb.ImageSize = getattr(cond, name)
    for axis, value in (("width", size.width), ("height", size.height)):
        if not 1 <= value <= MAX_CONDITIONING_PIXELS:
            bad(f"{field}.{name}.{axis}", f"must be between 1 and {MAX_CONDITIONING_PIXELS} pixels; got {value}")
    return (size.width, size.height)


def _crop(bad: Bad, field: str, name: str, cond: pb.MicroConditioning) -> Size | None:
    if not cond.HasField(name):  # type: ignore[arg-type]
        return None
    crop: pb.CropOffset = getattr(cond, name)
    for axis, value in (("top", crop.top), ("left", crop.left)):
        if value > MAX_CONDITIONING_PIXELS:
            bad(f"{field}.{name}.{axis}", f"must be between 0 and {MAX_CONDITIONING_PIXELS} pixels; got {value}")
    return (crop.top, crop.left)


def read_conditioning(bad: Bad, real: Real, p: pb.GenerationParams) -> ConditioningSpec:
    """params.conditioning as sent; every bad value reported through `bad`."""
    field = "params.conditioning"
    cond = p.conditioning
    score = neg_score = None
    if cond.HasField("aesthetic_score"):
        score = real(f"{field}.aesthetic_score", cond.aesthetic_score, 0.0, 10.0, False)
    if cond.HasField("negative_aesthetic_score"):
        neg_score = real(f"{field}.negative_aesthetic_score", cond.negative_aesthetic_score, 0.0, 10.0, False)
    return ConditioningSpec(
        original_size=_size(bad, field, "original_size", cond),
        crops_coords_top_left=_crop(bad, field, "crops_coords_top_left", cond),
        target_size=_size(bad, field, "target_size", cond),
        negative_original_size=_size(bad, field, "negative_original_size", cond),
        negative_crops_coords_top_left=_crop(bad, field, "negative_crops_coords_top_left", cond),
        negative_target_size=_size(bad, field, "negative_target_size", cond),
        aesthetic_score=score,
        negative_aesthetic_score=neg_score,
    )


def read_refiner(bad: Bad, real: Real, p: pb.GenerationParams) -> RefinerSpec | None:
    """params.refiner as sent (None when unset); every bad value reported through `bad`."""
    if not p.HasField("refiner"):
        return None
    field = "params.refiner"
    r = p.refiner
    if not r.model:
        bad(f"{field}.model", "is required with a refiner: the name or alias of an SDXL refiner model")
    elif len(r.model) > 200:
        bad(f"{field}.model", "must be at most 200 characters")
    mode = REFINER_MODES.get(r.mode)
    if mode is None:
        bad(f"{field}.mode", f"unknown refiner mode {r.mode}")
        mode = RefinerMode.LATENT_HANDOFF
    switch_at = strength = None
    if r.HasField("switch_at"):
        switch_at = real(f"{field}.switch_at", r.switch_at, 0.0, 1.0, True)
        if switch_at >= 1.0:
            bad(f"{field}.switch_at", "must be below 1: at 1 the refiner would run no step")
        if mode is not RefinerMode.LATENT_HANDOFF:
            bad(f"{field}.switch_at", "applies to mode REFINER_MODE_LATENT_HANDOFF only")
    if r.HasField("strength"):
        strength = real(f"{field}.strength", r.strength, 0.0, 1.0, True)
        if mode is not RefinerMode.IMAGE:
            bad(f"{field}.strength", "applies to mode REFINER_MODE_IMAGE only")
    return RefinerSpec(model=r.model, mode=mode, switch_at=switch_at, strength=strength)


def family_violations(req: GenerationRequest, entry: ModelEntry) -> list[FieldViolation]:
    """The family-only fields that `entry`'s family does not take."""
    if entry.family == SDXL:
        return []
    sent = {
        "params.prompt_2": bool(req.prompt_2),
        "params.negative_prompt_2": bool(req.negative_prompt_2),
        "params.conditioning": not req.conditioning.is_empty(),
        "params.refiner": req.refiner is not None,
    }
    return [
        FieldViolation(name, f"is for SDXL models; model {entry.name!r} is of family {entry.family}")
        for name, present in sent.items()
        if present
    ]


def _hw(size: Size | None) -> tuple[int, int] | None:
    """(width, height) as sent to (height, width) as diffusers takes sizes."""
    return None if size is None else (size[1], size[0])


def conditioning(req: GenerationRequest, width: int, height: int) -> Conditioning:
    """The micro-conditioning with defaults filled in: original and target size the output size, crop (0, 0), the
    negative sizes as diffusers defaults them (None: the positive ones), aesthetic scores 6.0 and 2.5."""
    spec = req.conditioning
    score = DEFAULT_AESTHETIC_SCORE if spec.aesthetic_score is None else spec.aesthetic_score
    neg = DEFAULT_NEGATIVE_AESTHETIC_SCORE if spec.negative_aesthetic_score is None else spec.negative_aesthetic_score
    return Conditioning(
        original_size=_hw(spec.original_size) or (height, width),
        crops_coords_top_left=spec.crops_coords_top_left or (0, 0),
        target_size=_hw(spec.target_size) or (height, width),
        negative_original_size=_hw(spec.negative_original_size),
        negative_crops_coords_top_left=spec.negative_crops_coords_top_left or (0, 0),
        negative_target_size=_hw(spec.negative_target_size),
        aesthetic_score=score,
        negative_aesthetic_score=neg,
    )


def refiner_violations(
    req: GenerationRequest, entry: ModelEntry, refiner: ModelEntry | None, steps: int, strength: float
) -> list[FieldViolation]:
    """The rules of the refiner pass (and of aesthetic scores, which only refiners take), `refiner` being the model
    the request names (looked up already)."""
    out: list[FieldViolation] = []
    scores = req.conditioning.aesthetic_score is not None or req.conditioning.negative_aesthetic_score is not None
    if scores and not entry.refiner and req.refiner is None:
        out.append(
            FieldViolation("params.conditioning.aesthetic_score", "applies to refiner models and refiner passes only")
        )
    if req.refiner is None or refiner is None:
        return out
    field = "params.refiner"
    if req.task is Task.INPAINT:
        out.append(FieldViolation(field, "is for Generate and Edit; Inpaint with a refiner pass is not supported"))
    spec = req.refiner
    limit = schedulers.max_steps(req.scheduler, refiner.scheduler_config)
    if steps > limit:
        out.append(FieldViolation("params.steps", f"must be at most {limit} for refiner {refiner.name!r}; got {steps}"))
    if req.clip_skip >= refiner.text_encoder_layers:
        out.append(FieldViolation("params.clip_skip", f"must be below refiner {refiner.name!r}'s text encoder depth"))
    if spec.mode is RefinerMode.IMAGE:
        r_strength = DEFAULT_REFINER_STRENGTH if spec.strength is None else spec.strength
        if int(steps * r_strength) < 1:
            out.append(
                FieldViolation(
                    f"{field}.strength", f"steps x strength must be at least 1; got {steps} x {r_strength:g}"
                )
            )
        return out
    switch = DEFAULT_SWITCH_AT if spec.switch_at is None else spec.switch_at
    base_steps = int(steps * switch)
    if base_steps < 1 or steps - base_steps < 1:
        out.append(
            FieldViolation(
                f"{field}.switch_at",
                f"leaves a pass without steps: {steps} steps split at {switch:g} give the base {base_steps} "
                f"and the refiner {steps - base_steps}; each needs at least 1",
            )
        )
    if req.task is Task.EDIT and strength <= 1.0 - switch:
        out.append(
            FieldViolation(
                f"{field}.switch_at",
                f"an Edit at strength {strength:g} starts after the hand-off at {switch:g}: the base pass would run "
                f"no step; use strength above {1.0 - switch:g}, a lower switch_at, or mode REFINER_MODE_IMAGE",
            )
        )
    return out


def resolve_refiner(spec: RefinerSpec | None, refiner: ModelEntry | None) -> ResolvedRefiner | None:
    """The refiner pass with defaults filled in (None without one)."""
    if spec is None or refiner is None:
        return None
    return ResolvedRefiner(
        identity=refiner.identity,
        mode=spec.mode,
        switch_at=DEFAULT_SWITCH_AT if spec.switch_at is None else spec.switch_at,
        strength=DEFAULT_REFINER_STRENGTH if spec.strength is None else spec.strength,
    )
