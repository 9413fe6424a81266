"""Runs a PipelineCall: builds the family's pipeline and its arguments, then calls it. The one place in the
repository that calls a diffusers pipeline; warm-up and batch-size calibration are calls like any other."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from sdserve_core import families, profiles
from sdserve_core.components import Components
from sdserve_core.memory import MemoryPlan, applied
from sdserve_core.pipeline import edit, generate, inpaint
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.steps import StepCallback
from sdserve_core.tasks import Task

KWARGS: dict[Task, Callable[[PipelineCall], dict[str, Any]]] = {
    Task.GENERATE: generate.kwargs,
    Task.EDIT: edit.kwargs,
    Task.INPAINT: inpaint.kwargs,
}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A pipeline object and its arguments, ready to run: what `prepare` builds before the clock starts."""

    pipe: Any
    kwargs: dict[str, Any]
    memory: MemoryPlan | None = None
    profile: profiles.Profile | None = None
    # The eager UNet the profile's memory format applies to (the pipeline's may be its compiled wrapper).
    unet: Any = None

    def __call__(self, on_step: StepCallback | None = None) -> Any:
        """Runs the pipeline (inference mode, with the call's memory strategies and execution profile on) and
        returns its `.images`; StopDenoising from `on_step` propagates."""
        extra: dict[str, Any] = {} if on_step is None else {"callback_on_step_end": on_step}
        strategies: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        unet = self.unet if self.unet is not None else self.pipe.unet
        if self.memory is not None:
            strategies = applied(self.pipe.vae, unet, self.memory)
        profile = profiles.applied(self.profile, unet, self.pipe.device.type)
        with torch.inference_mode(), strategies, profile:
            return self.pipe(**self.kwargs, **extra).images


def prepare(components: Components, call: PipelineCall, scheduler: Any) -> Prepared:
    """The family's pipeline for the call's task over `components` with `scheduler`, and the task's arguments."""
    family = families.get(components.family)
    kwargs = KWARGS[call.task](call)
    family.add_kwargs(components, call, kwargs)
    eager = components.unet
    if call.profile is not None and call.profile.compile:
        components = dataclasses.replace(components, unet=profiles.compiled_unet(eager, call.profile.cuda_graphs))
    elif call.profile is not None and call.profile.onnxruntime:
        from sdserve_core import onnx_unet

        components = dataclasses.replace(components, unet=onnx_unet.ort_unet(eager))
    return Prepared(family.pipeline(components, call.task, scheduler), kwargs, call.memory, call.profile, eager)


def offload(components: Components, device: torch.device | str) -> None:
    """Model CPU offload of `components` (loaded on the CPU): each module moves to `device` only while it runs
    (diffusers' enable_model_cpu_offload, whose accelerate hooks stay on the shared modules, so every pipeline built
    over them later runs on `device`)."""
    pipe = families.get(components.family).pipeline(components, Task.EDIT, None)
    pipe.enable_model_cpu_offload(device=device)


def run(components: Components, call: PipelineCall, scheduler: Any, on_step: StepCallback | None = None) -> Any:
    """Runs `call` and returns the pipeline's `.images` (PIL images, an array for "np", latents for "latent")."""
    return prepare(components, call, scheduler)(on_step)


def warm_up(
    components: Components, task: Task, width: int, height: int, scheduler: Any, profile: profiles.Profile | None = None
) -> None:
    """One denoising step of an empty prompt at `width` x `height` (seed 0). Edit and inpaint start from a black
    image at strength 1.0; inpaint repaints all of it (a white mask)."""
    size = (width, height)
    image = None if task is Task.GENERATE else Image.new("RGB", size)
    call = PipelineCall(
        task=task,
        steps=1,
        width=width,
        height=height,
        generators=torch.Generator("cpu").manual_seed(0),
        output_type="pil",
        prompt="",
        images=image,
        masks=Image.new("L", size, 255) if task is Task.INPAINT else None,
        strength=None if task is Task.GENERATE else 1.0,
        profile=profile,
    )
    run(components, call, scheduler)


def step_seconds(
    components: Components,
    images: int,
    steps: int,
    width: int,
    height: int,
    scheduler: Any,
    profile: profiles.Profile | None = None,
) -> float:
    """Seconds per denoising step of a batch of `images` empty prompts at `width` x `height` (seeds 0, 1, ...),
    measured between the first and the last step's end (setup and decoding excluded: latents are not decoded)."""
    clock = StepCallback()
    call = PipelineCall(
        task=Task.GENERATE,
        steps=steps,
        width=width,
        height=height,
        generators=tuple(torch.Generator("cpu").manual_seed(i) for i in range(images)),
        output_type="latent",
        prompt=("",) * images,
        profile=profile,
    )
    run(components, call, scheduler, clock)
    return clock.seconds_per_step()
