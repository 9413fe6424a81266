"""PipelineCall: everything one pipeline call needs, whoever asks (a server batch, warm-up, calibration, the
sidecar's quality render), and the arguments every task passes the same way."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias, TypeVar

import torch
from PIL import Image

from sdserve_core.memory import MemoryPlan
from sdserve_core.profiles import Profile
from sdserve_core.prompts import PromptEmbeds
from sdserve_core.tasks import Task

T = TypeVar("T")
# One value for the whole call, or one per image (passed to diffusers as a list).
OneOrEach: TypeAlias = "T | tuple[T, ...]"
# (height, width) or (top, left) in pixels, as diffusers takes them.
Pair = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """SDXL's micro-conditioning for one call, in diffusers' terms (sizes are (height, width), the crop offset
    (top, left)). None means the pipeline's default; the aesthetic scores apply to refiner UNets only."""

    original_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair = (0, 0)
    negative_target_size: Pair | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclasses.dataclass(frozen=True)
class PipelineCall:
    """One pipeline call. Prompts are given either as text (`prompt`) or as embeddings (`embeds`, from the
    family's encode_prompt). None means the pipeline's own default where it has one. `conditioning`,
    `denoising_start` and `denoising_end` are for families that take them (SDXL); others refuse them."""

    task: Task
    steps: int
    width: int
    height: int
    generators: OneOrEach[torch.Generator]
    output_type: str = "pil"  # "pil", "np" or "latent"
    guidance_scale: float | None = None
    prompt: str | tuple[str, ...] | None = None
    embeds: PromptEmbeds | None = None
    # Edit and inpaint: the init images, or (edit, SDXL refiner hand-off) latents; inpaint: the masks (white is
    # repainted).
    images: OneOrEach[Image.Image] | torch.Tensor | None = None
    masks: OneOrEach[Image.Image] | None = None
    strength: float | None = None
    # Inpaint only: repaint a crop around the mask with this many pixels of padding (diffusers' padding_mask_crop).
    mask_padding: int | None = None
    conditioning: Conditioning | None = None
    # The fraction of the schedule to stop at (a base model handing off to a refiner) or to start from (the
    # refiner taking over); diffusers' denoising_end / denoising_start.
    denoising_start: float | None = None
    denoising_end: float | None = None
    # Memory strategies for this call (sdserve_core.memory); None: the components as they are.
    memory: MemoryPlan | None = None
    # The execution profile (sdserve_core.profiles); None: EXACT, the pipeline as diffusers runs it.
    profile: Profile | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.embeds is None):
            raise ValueError("a PipelineCall takes either prompts or prompt embeddings")
        if self.denoising_start is not None and self.task is Task.GENERATE:
            raise ValueError("denoising_start is for edit and inpaint")
        if self.task is not Task.GENERATE and self.images is None:
            raise ValueError(f"{self.task.value} needs init images")
        if self.task is Task.INPAINT and self.masks is None:
            raise ValueError("inpaint needs masks")
        if self.mask_padding is not None and self.task is not Task.INPAINT:
            raise ValueError("mask_padding is for inpaint only")

    @property
    def count(self) -> int:
        """How many images the call makes (one per generator)."""
        return len(self.generators) if isinstance(self.generators, tuple) else 1


def one_or_list(value: OneOrEach[T]) -> T | list[T]:
    """The diffusers form of a one-or-per-image value: the value itself, or a list."""
    return list(value) if isinstance(value, tuple) else value


def first(value: OneOrEach[T]) -> T:
    """The value for the first image."""
    return value[0] if isinstance(value, tuple) else value


def common_kwargs(call: PipelineCall) -> dict[str, Any]:
    """The arguments every task passes: prompt or embeddings, steps, guidance, generators and output type."""
    kwargs: dict[str, Any] = {}
    if call.prompt is not None:
        kwargs["prompt"] = one_or_list(call.prompt)
    else:
        assert call.embeds is not None
        kwargs["prompt_embeds"] = call.embeds.positive
        kwargs["negative_prompt_embeds"] = call.embeds.negative
    kwargs["num_inference_steps"] = call.steps
    if call.guidance_scale is not None:
        kwargs["guidance_scale"] = call.guidance_scale
    kwargs["generator"] = one_or_list(call.generators)
    kwargs["output_type"] = call.output_type
    return kwargs
