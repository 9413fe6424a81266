"""Every rule a request must meet: its fields (read from protobuf, every violation collected) and, once bound to
the model that serves it, the model's own rules; the model-dependent defaults are filled in here too."""

from __future__ import annotations

import math
import secrets
import uuid

import numpy as np
from PIL import Image

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.prompt_syntax import PromptSyntaxError, extract_loras
from sdserve_core.status import FieldViolation
from service import family_params, imaging, schedulers
from service.convert import AREAS, FORMAT_NAMES, PREVIEW_MODES, scheduler_from_proto
from service.device import DeviceChoice
from service.errors import InvalidRequest
from service.models import ModelEntry
from service.requests import (
    AdapterRequest,
    GenerationRequest,
    InpaintArea,
    InpaintSpec,
    OutputSpec,
    PreviewMode,
    PreviewSpec,
    ResolvedRequest,
    Task,
)
from service.settings import Settings

_U64 = 1 << 64


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
    mode = PREVIEW_MODES.get(p.mode)
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
        fmt = FORMAT_NAMES.get(p.format, "")
        if not fmt:
            c.bad("params.preview.format", f"unknown image format {p.format}")
    quality = c.int_range("params.preview.quality", p.quality, 0, 100) or 75
    return PreviewSpec(mode=mode, every_n_steps=every, max_edge=edge, format=fmt or "jpeg", quality=quality)


def _output(c: _Checker, o: pb.OutputOptions) -> OutputSpec:
    fmt = "png"
    if o.format != pb.IMAGE_FORMAT_UNSPECIFIED:
        fmt = FORMAT_NAMES.get(o.format, "")
        if not fmt:
            c.bad("params.output.format", f"unknown image format {o.format}")
    quality = c.int_range("params.output.quality", o.quality, 0, 100) or 90
    embed = o.embed_parameters if o.HasField("embed_parameters") else True
    return OutputSpec(format=fmt or "png", quality=quality, embed_parameters=embed)


ADAPTER_SCALE = 4.0


def _inline_loras(c: _Checker, field: str, text: str) -> tuple[str, list[AdapterRequest]]:
    """The text without its <lora:NAME:SCALE> tags, and the LoRAs they name (scale absent: 1)."""
    try:
        clean, tags = extract_loras(text)
    except PromptSyntaxError as exc:
        c.bad(field, str(exc))
        return text, []
    return clean, [AdapterRequest(n, 1.0 if v is None else v, field) for n, v in tags]


def _adapter_refs(c: _Checker, p: pb.GenerationParams, inline: list[AdapterRequest]) -> tuple[AdapterRequest, ...]:
    """params.adapters then the inline tags, each checked: a name, a finite scale within +-4, no name twice, at
    most max_adapters. Each one's `field` names where it was asked for (the name field, or the prompt)."""
    refs = [
        AdapterRequest(a.name, decimal32(a.scale) if a.HasField("scale") else 1.0, f"params.adapters[{i}].name")
        for i, a in enumerate(p.adapters)
    ]
    refs += inline
    seen: dict[str, str] = {}
    for ref in refs:
        if not ref.name or len(ref.name) > 200:
            c.bad(ref.field, "must name an adapter (1 to 200 characters)")
        elif ref.name in seen:
            c.bad(ref.field, f"adapter {ref.name!r} is already named by {seen[ref.name]}; name each adapter once")
        seen.setdefault(ref.name, ref.field)
        if not math.isfinite(ref.scale) or abs(ref.scale) > ADAPTER_SCALE:
            scale_field = ref.field.removesuffix(".name") + ".scale" if ref.field.endswith(".name") else ref.field
            rule = f"adapter scale must be between -{ADAPTER_SCALE:g} and {ADAPTER_SCALE:g}; got {ref.scale:g}"
            c.bad(scale_field, rule)
    if len(refs) > c.s.max_adapters:
        c.bad("params.adapters", f"at most {c.s.max_adapters} adapters per request (max_adapters); got {len(refs)}")
    return tuple(refs)


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
    prompt, tags = _inline_loras(c, "params.prompt", c.text("params.prompt", p.prompt, s.max_prompt_chars))
    negative, negative_tags = _inline_loras(
        c, "params.negative_prompt", c.text("params.negative_prompt", p.negative_prompt, s.max_prompt_chars)
    )
    return {
        "task": task,
        "model": p.model,
        "prompt": prompt,
        "negative_prompt": negative,
        "adapters": _adapter_refs(c, p, tags + negative_tags),
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
        "prompt_2": c.text("params.prompt_2", p.prompt_2, s.max_prompt_chars),
        "negative_prompt_2": c.text("params.negative_prompt_2", p.negative_prompt_2, s.max_prompt_chars),
        "conditioning": family_params.read_conditioning(c.bad, c.real_range, p),
        "refiner": family_params.read_refiner(c.bad, c.real_range, p),
        "precision": _precision(c, p.precision),
    }


_PRECISIONS: dict[int, str] = {pb.PRECISION_UNSPECIFIED: "", pb.PRECISION_EXACT: "exact", pb.PRECISION_FAST: "fast"}


def _precision(c: _Checker, value: int) -> str:
    """The request's precision, the server's `precision` setting when it names none."""
    name = _PRECISIONS.get(value)
    if name is None:
        c.bad("params.precision", f"must be PRECISION_EXACT, PRECISION_FAST or unset; got {value}")
        return c.s.precision
    return name or c.s.precision


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


def _asked_strength(c: _Checker, msg: pb.EditRequest | pb.InpaintRequest) -> float | None:
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
    return _done(c, **fields, image=image, strength=_asked_strength(c, msg))


def inpaint_request(msg: pb.InpaintRequest, settings: Settings) -> GenerationRequest:
    """Validates an InpaintRequest; raises InvalidRequest listing every bad field."""
    c = _Checker(settings)
    fields = _params(c, Task.INPAINT, msg.params)
    area = AREAS.get(msg.area)
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
    strength = _asked_strength(c, msg)
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


def _size(req: GenerationRequest, entry: ModelEntry) -> tuple[int, int]:
    """Width and height: as asked, else the input image's (not for MASK_ONLY, which works on a crop), else the
    model's default."""
    width, height = req.width, req.height
    if req.image is not None and not (
        req.task is Task.INPAINT and req.inpaint is not None and req.inpaint.area is InpaintArea.MASK_ONLY
    ):
        width = width or req.image.width
        height = height or req.image.height
    return width or entry.default_width, height or entry.default_height


def _strength(req: GenerationRequest) -> float:
    """The asked strength, else the task's default (0.8 for Edit, 1.0 for Inpaint; 0 for Generate)."""
    if req.task is Task.GENERATE:
        return 0.0
    default = 0.8 if req.task is Task.EDIT else 1.0
    return default if req.strength is None else req.strength


def model_violations(
    req: GenerationRequest, entry: ModelEntry, size: tuple[int, int], steps: int, strength: float
) -> list[FieldViolation]:
    """The rules that depend on the model serving the request (and on the defaults it fills in)."""
    violations: list[FieldViolation] = []
    if req.clip_skip >= entry.text_encoder_layers:
        violations.append(
            FieldViolation(
                "params.clip_skip",
                f"must be below the text encoder's depth ({entry.text_encoder_layers} layers) for model "
                f"{entry.name!r}; got {req.clip_skip}",
            )
        )
    limit = schedulers.max_steps(req.scheduler, entry.scheduler_config)
    if steps > limit:
        shown = req.scheduler or schedulers.native_name(entry.scheduler_config)
        violations.append(
            FieldViolation(
                "params.steps", f"must be at most {limit} with scheduler {shown} for model {entry.name!r}; got {steps}"
            )
        )
    if req.inpaint is not None and req.image is not None and req.inpaint.area is InpaintArea.MASK_ONLY:
        problem = crop_problem(req.image, req.inpaint.mask, req.inpaint, *size)
        if problem:
            violations.append(FieldViolation("area", problem))
    if req.task is not Task.GENERATE and int(steps * strength) < 1:
        violations.append(
            FieldViolation(
                "params.steps",
                f"steps x strength must be at least 1 so one denoising step runs; got {steps} x {strength:g}",
            )
        )
    return violations


def bind(
    req: GenerationRequest, entry: ModelEntry, choice: DeviceChoice, refiner: ModelEntry | None = None
) -> ResolvedRequest:
    """Binds a valid request to the model that serves it (and to the refiner it names, looked up already): fills in
    width, height, steps, guidance, scheduler, seeds, strength and the family's own parameters, and checks the
    model's rules (raises InvalidRequest naming each broken one)."""
    width, height = _size(req, entry)
    strength = _strength(req)
    steps = req.steps or entry.default_steps
    violations = family_params.family_violations(req, entry)
    if not violations:
        violations = model_violations(req, entry, (width, height), steps, strength)
        violations += family_params.refiner_violations(req, entry, refiner, steps, strength)
    if violations:
        raise InvalidRequest(violations)
    sdxl = entry.family == family_params.SDXL
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
        family=entry.family,
        conditioning=family_params.conditioning(req, width, height) if sdxl else None,
        refiner=family_params.resolve_refiner(req.refiner, refiner),
        precision=req.precision,
    )
