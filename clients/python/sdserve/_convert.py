"""Client-side conversion between keyword options, protobuf messages and the typed dataclasses."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format

from sdserve.types import (
    MAX_ADAPTER_SCALE,
    AdapterInfo,
    AdapterKindName,
    AdapterSpec,
    CropOffset,
    DenoisePassName,
    EditOptions,
    Event,
    GeneratedImage,
    GenerationOptions,
    ImageSize,
    InpaintOptions,
    MicroConditioning,
    ModelInfo,
    PreviewImage,
    Progress,
    Queued,
    RefinerModeName,
    RefinerPass,
    ResolvedAdapter,
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
_REFINER_MODES: dict[RefinerModeName, pb.RefinerMode.ValueType] = {
    "latent_handoff": pb.REFINER_MODE_LATENT_HANDOFF,
    "image": pb.REFINER_MODE_IMAGE,
}
_REFINER_MODE_NAMES = {v: k for k, v in _REFINER_MODES.items()}
_PASSES: dict[int, DenoisePassName] = {pb.DENOISE_PASS_BASE: "base", pb.DENOISE_PASS_REFINER: "refiner"}
_SIZES = ("original_size", "target_size", "negative_original_size", "negative_target_size")
_CROPS = ("crops_coords_top_left", "negative_crops_coords_top_left")
_SCORES = ("aesthetic_score", "negative_aesthetic_score")
_REFINER_ONLY = ("refiner_mode", "refiner_switch_at", "refiner_strength")
_ADAPTER_KINDS: dict[int, AdapterKindName] = {
    pb.ADAPTER_KIND_LORA: "lora",
    pb.ADAPTER_KIND_TEXTUAL_INVERSION: "textual_inversion",
}

_PRECISIONS = {"exact": pb.PRECISION_EXACT, "fast": pb.PRECISION_FAST}
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
    p.prompt_2 = o.get("prompt_2", "")
    p.negative_prompt_2 = o.get("negative_prompt_2", "")
    _conditioning(p.conditioning, o)
    _refiner(p, o)
    if o.get("adapters") is not None:
        p.adapters.extend(adapter_refs(o["adapters"]))
    if o.get("precision"):
        if o["precision"] not in _PRECISIONS:
            raise ValueError(f"precision: must be exact or fast, not {o['precision']!r}")
        p.precision = _PRECISIONS[o["precision"]]
    return p


def _adapter_items(spec: AdapterSpec) -> Iterable[tuple[int, object, object]]:
    """(index, name, scale) for each entry of a mapping, or of a sequence of names and (name, scale) pairs."""
    if isinstance(spec, str | bytes):
        raise TypeError(f"adapters: must be a list of names or (name, scale) pairs, or a mapping, not {spec!r}")
    if isinstance(spec, Mapping):
        return ((i, name, scale) for i, (name, scale) in enumerate(spec.items()))
    items = []
    for i, entry in enumerate(spec):
        if isinstance(entry, tuple | list):
            if len(entry) != 2:
                raise ValueError(f"adapters[{i}]: must be a name or a (name, scale) pair, got {entry!r}")
            items.append((i, entry[0], entry[1]))
        else:
            items.append((i, entry, None))
    return items


def adapter_refs(spec: AdapterSpec) -> list[pb.AdapterRef]:
    """The `adapters` option as AdapterRef messages, checked against the contract's rules (ValueError naming the
    field, e.g. `adapters[1].scale`): a non-empty name, each name once, a finite scale from -4 to 4. A scale of
    None stays unset (the server's default, 1)."""
    refs: list[pb.AdapterRef] = []
    seen: dict[str, int] = {}
    for i, name, scale in _adapter_items(spec):
        if not isinstance(name, str):
            raise TypeError(f"adapters[{i}].name: must be a str, got {name!r}")
        if not name.strip():
            raise ValueError(f"adapters[{i}].name: must not be empty")
        if name in seen:
            raise ValueError(f"adapters[{i}].name: {name!r} is already adapters[{seen[name]}] (each adapter once)")
        seen[name] = i
        ref = pb.AdapterRef(name=name)
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, int | float):
                raise TypeError(f"adapters[{i}].scale: must be a number, got {scale!r}")
            if not math.isfinite(scale) or not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
                raise ValueError(
                    f"adapters[{i}].scale: must be a finite number from {-MAX_ADAPTER_SCALE:g} to "
                    f"{MAX_ADAPTER_SCALE:g}, got {scale!r}"
                )
            ref.scale = float(scale)
        refs.append(ref)
    return refs


def adapter_kind(kind: int) -> AdapterKindName:
    return _ADAPTER_KINDS.get(kind, "")


def resolved_adapters(adapters: Iterable[pb.ResolvedAdapter]) -> tuple[ResolvedAdapter, ...]:
    """ResolvedAdapter messages (Started, ResolvedParameters) as typed dataclasses, in the server's order."""
    return tuple(ResolvedAdapter(a.name, adapter_kind(a.kind), a.scale, a.sha256, a.token) for a in adapters)


def adapter_info(a: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        name=a.name,
        kind=adapter_kind(a.kind),
        family=a.family,
        base=a.base,
        token=a.token,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        targets=tuple(a.targets),
        loaded_in=tuple(a.loaded_in),
    )


def _conditioning(c: pb.MicroConditioning, o: dict[str, Any]) -> None:
    """Fills `c` from the flat micro-conditioning options; absent ones stay unset (the server's defaults)."""
    for key in _SIZES:
        size = o.get(key)
        if size is not None:
            getattr(c, key).CopyFrom(pb.ImageSize(width=size.width, height=size.height))
    for key in _CROPS:
        crop = o.get(key)
        if crop is not None:
            getattr(c, key).CopyFrom(pb.CropOffset(top=crop.top, left=crop.left))
    for key in _SCORES:
        if o.get(key) is not None:
            setattr(c, key, o[key])


def _refiner(p: pb.GenerationParams, o: dict[str, Any]) -> None:
    """Sets the refiner pass; its mode, switch and strength mean nothing without a refiner model."""
    if not o.get("refiner"):
        given = [k for k in _REFINER_ONLY if o.get(k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) `refiner`, the refiner model's name")
        return
    p.refiner.model = o["refiner"]
    if o.get("refiner_mode"):
        p.refiner.mode = _REFINER_MODES[o["refiner_mode"]]
    if o.get("refiner_switch_at") is not None:
        p.refiner.switch_at = o["refiner_switch_at"]
    if o.get("refiner_strength") is not None:
        p.refiner.strength = o["refiner_strength"]


def _size(s: pb.ImageSize) -> ImageSize:
    return ImageSize(s.width, s.height)


def _crop(s: pb.CropOffset) -> CropOffset:
    return CropOffset(s.top, s.left)


def conditioning(c: pb.MicroConditioning) -> MicroConditioning:
    """A MicroConditioning message as the typed dataclass (unset fields: None)."""
    return MicroConditioning(
        original_size=_size(c.original_size) if c.HasField("original_size") else None,
        crops_coords_top_left=_crop(c.crops_coords_top_left) if c.HasField("crops_coords_top_left") else None,
        target_size=_size(c.target_size) if c.HasField("target_size") else None,
        negative_original_size=_size(c.negative_original_size) if c.HasField("negative_original_size") else None,
        negative_crops_coords_top_left=(
            _crop(c.negative_crops_coords_top_left) if c.HasField("negative_crops_coords_top_left") else None
        ),
        negative_target_size=_size(c.negative_target_size) if c.HasField("negative_target_size") else None,
        aesthetic_score=c.aesthetic_score if c.HasField("aesthetic_score") else None,
        negative_aesthetic_score=c.negative_aesthetic_score if c.HasField("negative_aesthetic_score") else None,
    )


def refiner_pass(r: pb.ResolvedParameters) -> RefinerPass | None:
    """The refiner pass a result ran with (None without one)."""
    if not r.HasField("refiner"):
        return None
    o = r.refiner
    return RefinerPass(
        model=o.model,
        revision=r.refiner_model_revision,
        variant=r.refiner_model_variant,
        mode=_REFINER_MODE_NAMES.get(o.mode, "latent_handoff"),
        switch_at=o.switch_at if o.HasField("switch_at") else None,
        strength=o.strength if o.HasField("strength") else None,
    )


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
            refiner_model=s.refiner_model,
            refiner_model_revision=s.refiner_model_revision,
            refiner_model_variant=s.refiner_model_variant,
            memory_strategy=s.memory_strategy,
            adapters=resolved_adapters(s.adapters),
            execution_profile=s.execution_profile,
            requested_model=s.requested_model,
            replica=s.replica,
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
            denoise_pass=_PASSES.get(p.denoise_pass, ""),
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
            refiner=refiner_pass(r.parameters),
            conditioning=conditioning(r.parameters.conditioning) if r.parameters.HasField("conditioning") else None,
            memory_strategy=r.parameters.memory_strategy,
            adapters=resolved_adapters(r.parameters.adapters),
            execution_profile=r.parameters.execution_profile,
            replica=r.parameters.replica,
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
        family=m.family,
        refiner=m.refiner,
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
