"""Builds every protobuf message the server sends: stream events, results, the model list and server info; and
the enum maps that reading requests uses."""

from __future__ import annotations

import math
import platform
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core import families
from sdserve_core.pipeline.call import Conditioning
from service import family_params, schedulers
from service.batching import Limit as BatchLimit
from service.device import DeviceChoice
from service.models import ModelRegistry, ModelState
from service.requests import (
    AdapterUse,
    Event,
    InpaintArea,
    PreviewMode,
    Progress,
    Queued,
    RefinerMode,
    ResolvedRequest,
    Result,
    Started,
    Task,
)
from service.settings import Settings

if TYPE_CHECKING:
    from service.adapters import AdapterEntry
    from service.execution import Choice

VERSION = "0.1.0"

FORMAT_NAMES = {pb.IMAGE_FORMAT_PNG: "png", pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_WEBP: "webp"}
_FORMAT_ENUM = {v: k for k, v in FORMAT_NAMES.items()}
PREVIEW_MODES = {
    pb.PREVIEW_MODE_UNSPECIFIED: PreviewMode.NONE,
    pb.PREVIEW_MODE_NONE: PreviewMode.NONE,
    pb.PREVIEW_MODE_LATENT_RGB: PreviewMode.LATENT_RGB,
    pb.PREVIEW_MODE_FULL_VAE: PreviewMode.FULL_VAE,
}
AREAS = {
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
                refiner_model=event.refiner.model if event.refiner else "",
                refiner_model_revision=event.refiner.revision if event.refiner else "",
                refiner_model_variant=event.refiner.variant if event.refiner else "",
                memory_strategy=event.memory_strategy,
                adapters=adapters_to_proto(event.adapters),
                execution_profile=event.execution_profile,
                requested_model=event.requested_model,
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
                denoise_pass=_PASS_ENUM[event.denoise_pass],
            )
        )
    if isinstance(event, Result):
        return cls(result=result_to_proto(event))
    raise TypeError(f"not a stream event: {event!r}")


_PASS_ENUM = {"base": pb.DENOISE_PASS_BASE, "refiner": pb.DENOISE_PASS_REFINER}
_REFINER_MODE_ENUM = {
    RefinerMode.LATENT_HANDOFF: pb.REFINER_MODE_LATENT_HANDOFF,
    RefinerMode.IMAGE: pb.REFINER_MODE_IMAGE,
}


def _size(hw: tuple[int, int] | None) -> pb.ImageSize | None:
    """diffusers' (height, width) as an ImageSize."""
    return None if hw is None else pb.ImageSize(width=hw[1], height=hw[0])


def conditioning_to_proto(c: Conditioning) -> pb.MicroConditioning:
    top, left = c.crops_coords_top_left
    n_top, n_left = c.negative_crops_coords_top_left
    return pb.MicroConditioning(
        original_size=_size(c.original_size),
        crops_coords_top_left=pb.CropOffset(top=top, left=left),
        target_size=_size(c.target_size),
        negative_original_size=_size(c.negative_original_size),
        negative_crops_coords_top_left=pb.CropOffset(top=n_top, left=n_left),
        negative_target_size=_size(c.negative_target_size),
        aesthetic_score=c.aesthetic_score,
        negative_aesthetic_score=c.negative_aesthetic_score,
    )


_KIND_ENUM = {"lora": pb.ADAPTER_KIND_LORA, "textual_inversion": pb.ADAPTER_KIND_TEXTUAL_INVERSION}


def adapters_to_proto(uses: Iterable[AdapterUse]) -> list[pb.ResolvedAdapter]:
    return [
        pb.ResolvedAdapter(name=u.name, kind=_KIND_ENUM[u.kind], scale=u.scale, sha256=u.sha256, token=u.token)
        for u in uses
    ]


def adapter_infos(entries: Iterable[AdapterEntry], loaded_in: dict[str, list[str]]) -> list[pb.AdapterInfo]:
    """GetServerInfo's adapters: what each is, what it fits, and which models hold it now."""
    out = []
    for e in entries:
        f = e.manifest.file
        out.append(
            pb.AdapterInfo(
                name=e.name,
                kind=_KIND_ENUM.get(f.kind, pb.ADAPTER_KIND_UNSPECIFIED),
                family=f.family,
                base=f.base,
                token=f.token,
                sha256=e.manifest.sha256,
                size_bytes=f.size_bytes,
                targets=list(f.targets),
                loaded_in=loaded_in.get(e.name, []),
            )
        )
    return out


def _family_parameters(r: ResolvedRequest) -> dict[str, Any]:
    """The ResolvedParameters fields of the family-only parameters and the memory strategy."""
    req = r.request
    out: dict[str, Any] = {
        "prompt_2": req.prompt_2,
        "negative_prompt_2": req.negative_prompt_2,
        "memory_strategy": r.memory_strategy,
        "adapters": adapters_to_proto(r.adapters),
        "execution_profile": r.execution_profile,
        "requested_model": r.requested_model,
        "precision": pb.PRECISION_EXACT if r.precision == "exact" else pb.PRECISION_FAST,
    }
    if r.conditioning is not None:
        out["conditioning"] = conditioning_to_proto(r.conditioning)
    if r.refiner is not None:
        ref = r.refiner
        handoff = ref.mode is RefinerMode.LATENT_HANDOFF
        # Only the parameter of the mode that ran is reported (switch_at for a hand-off, strength for IMAGE).
        out["refiner"] = pb.RefinerOptions(
            model=ref.identity.model,
            mode=_REFINER_MODE_ENUM[ref.mode],
            switch_at=ref.switch_at if handoff else None,
            strength=None if handoff else ref.strength,
        )
        out["refiner_model_revision"] = ref.identity.revision
        out["refiner_model_variant"] = ref.identity.variant
    return out


def stamp_replica(message: R, replica: str) -> R:
    """Names the replica that serves the request in a Started or Result message (others are left as they are)."""
    if message.HasField("started"):
        message.started.replica = replica
    elif message.HasField("result"):
        message.result.parameters.replica = replica
    return message


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
            **_family_parameters(r),
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


_STATE_ENUM = {
    ModelState.ON_DISK: pb.MODEL_STATE_ON_DISK,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.LOADED: pb.MODEL_STATE_LOADED,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}


def model_list(registry: ModelRegistry) -> pb.ListModelsResponse:
    """Every model slot the server knows, with its state, names, aliases and what it can do."""
    aliases = registry.aliases()
    weighted = registry.weighted_aliases()
    models = []
    for entry in registry.entries():
        state, error = registry.state(entry.slot)
        names = registry.public_names(entry.slot)
        models.append(
            pb.ModelInfo(
                name=entry.slot,
                revision=entry.revision,
                state=_STATE_ENUM[state],
                aliases=sorted(
                    [a for a in aliases if registry.slot_of(a) == entry.slot]
                    + [
                        a
                        for a, targets in weighted.items()
                        if any(registry.slot_of(t) == entry.slot for t, _ in targets)
                    ]
                    + [n for n in names if n != entry.name]
                ),
                tasks=[_TASK_ENUM[t] for t in entry.tasks],
                variant=entry.variant,
                default_width=entry.default_width,
                default_height=entry.default_height,
                unet_in_channels=entry.unet_in_channels,
                error=error,
                description=entry.description,
                inpaint_model=entry.inpaint_model,
                family=entry.family,
                refiner=entry.refiner,
            )
        )
    return pb.ListModelsResponse(models=models, default_model=registry.default)


def limits(s: Settings) -> pb.Limits:
    """The request limits the server enforces."""
    return pb.Limits(
        min_size=s.min_size,
        max_size=s.max_size,
        max_input_pixels=s.max_input_pixels,
        max_image_bytes=s.max_image_bytes,
        max_steps=s.max_steps,
        max_images=s.max_images,
        max_prompt_chars=s.max_prompt_chars,
        max_message_bytes=s.max_message_bytes,
        max_queue=s.max_queue,
        default_max_queue_seconds=s.default_max_queue_seconds,
        max_adapters=s.max_adapters,
    )


def memory_info(settings: Settings, choice: DeviceChoice, offloaded: Iterable[str]) -> pb.MemoryPolicy:
    """The memory settings, the device's free memory now (0 where unknown) and the models loaded with offload."""
    from sdserve_core.memory import free_device_bytes

    return pb.MemoryPolicy(
        vae_tiling=settings.vae_tiling,
        vae_tiling_min_pixels=settings.vae_tiling_min_pixels,
        vae_slicing=settings.vae_slicing,
        attention_slicing=settings.attention_slicing,
        cpu_offload=settings.cpu_offload,
        device_free_bytes=free_device_bytes(choice.device) or 0,
        offloaded_models=sorted(offloaded),
    )


def batch_limit(b: BatchLimit) -> pb.BatchLimit:
    return pb.BatchLimit(
        model=b.model,
        width=b.width,
        height=b.height,
        max_batch_images=b.max_images,
        source=b.source,
        variant=b.variant,
        precision=b.precision,
    )


def replica_name(settings: Settings) -> str:
    """The `replica` setting, or the host name (the pod name in Kubernetes) when it is empty."""
    return settings.replica or socket.gethostname()


def server_info(
    settings: Settings,
    choice: DeviceChoice,
    default_model: str,
    batch_limits: Iterable[BatchLimit],
    offloaded: Iterable[str] = (),
    adapters: Iterable[pb.AdapterInfo] = (),
    profiles: Iterable[Choice] = (),
) -> pb.GetServerInfoResponse:
    """The server's version, device, library versions, schedulers, limits, batch limits, families and memory."""
    import diffusers
    import torch
    import transformers

    return pb.GetServerInfoResponse(
        version=VERSION,
        device=choice.type,
        device_name=choice.name,
        dtype=choice.dtype_name,
        torch_version=torch.__version__,
        diffusers_version=diffusers.__version__,
        transformers_version=transformers.__version__,
        python_version=platform.python_version(),
        schedulers=[scheduler_to_proto(n) for n in schedulers.SCHEDULERS],
        limits=limits(settings),
        default_model=default_model,
        memory=memory_info(settings, choice, offloaded),
        families=[
            pb.FamilyInfo(
                name=f.name, pipeline_classes=sorted(f.pipeline_classes), fields=family_params.FIELDS.get(f.name, ())
            )
            for f in families.FAMILIES.values()
        ],
        batch_limits=[batch_limit(b) for b in batch_limits],
        adapters=adapters,
        precision=settings.precision,
        execution_profile=settings.execution_profile,
        profiles=[profile_info(c) for c in profiles],
        replica=replica_name(settings),
    )


def profile_info(c: Choice) -> pb.ExecutionProfileInfo:
    """GetServerInfo's account of one model's execution profile and the trials that chose it."""
    return pb.ExecutionProfileInfo(
        model=c.identity.model,
        model_revision=c.identity.revision,
        model_variant=c.identity.variant,
        width=c.width,
        height=c.height,
        profile=c.profile.name,
        source=c.source,
        seconds=c.seconds,
        trials=[
            pb.ProfileTrial(
                profile=t.profile.name,
                # A candidate that failed to run has no step time: 0.
                seconds_per_step=t.seconds_per_step if math.isfinite(t.seconds_per_step) else 0.0,
                psnr_db=t.psnr_db,
                accepted=t.accepted,
                reason=t.reason,
            )
            for t in c.trials
        ],
    )
