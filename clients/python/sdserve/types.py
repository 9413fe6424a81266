"""Typed results and events the client returns (frozen dataclasses, not protobuf messages)."""

from __future__ import annotations

import dataclasses
from typing import Literal, TypedDict, get_args

SchedulerName = Literal[
    "DDIM",
    "PNDM",
    "DDPM",
    "LMS",
    "EULER",
    "EULER_ANCESTRAL",
    "HEUN",
    "DPMPP_2M",
    "DPMPP_2M_KARRAS",
    "UNIPC",
    "LCM",
]
# Every scheduler the contract offers, in enum order.
SCHEDULER_NAMES: tuple[SchedulerName, ...] = get_args(SchedulerName)
ImageFormatName = Literal["png", "jpeg", "webp"]
PreviewModeName = Literal["none", "latent_rgb", "full_vae"]


class GenerationOptions(TypedDict, total=False):
    """Options shared by generate, edit and inpaint; every one is optional (server defaults apply)."""

    model: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: SchedulerName
    seed: int
    num_images: int
    clip_skip: int
    preview: PreviewModeName
    preview_every: int
    preview_max_edge: int
    preview_format: Literal["jpeg", "webp"]
    preview_quality: int
    output_format: ImageFormatName
    output_quality: int
    embed_parameters: bool
    request_id: str
    max_queue_seconds: float


class EditOptions(GenerationOptions, total=False):
    """Edit's own option on top of the shared ones."""

    # How far to move from the input, (0, 1]; server default 0.8.
    strength: float


class InpaintOptions(GenerationOptions, total=False):
    """Inpaint's own options on top of the shared ones (mask white = repaint)."""

    # (0, 1]; server default 1.
    strength: float
    # Gaussian blur of the mask edge in pixels, 0 to 64.
    mask_blur: int
    # Repaint the black part instead.
    invert_mask: bool
    # "whole_image" (default) or "mask_only" (a padded box around the mask at full resolution).
    area: Literal["whole_image", "mask_only"]
    # Padding around the mask box with area="mask_only", pixels (server default 32).
    mask_padding: int
    # Keep every pixel outside the mask byte-identical to the input.
    preserve_unmasked: bool


@dataclasses.dataclass(frozen=True)
class Queued:
    """The request waits; `position` requests are ahead of it (0: next)."""

    position: int


@dataclasses.dataclass(frozen=True)
class Started:
    """The request reached the device."""

    seeds: tuple[int, ...]
    model: str
    model_revision: str
    request_id: str
    queue_seconds: float
    batch_size: int
    # The stored weights serving the request (fp32, fp16, bf16, int8) and the dtype it computes in.
    model_variant: str = ""
    dtype: str = ""


@dataclasses.dataclass(frozen=True)
class PreviewImage:
    """An intermediate image."""

    index: int
    data: bytes
    format: str
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Progress:
    """A denoising step finished."""

    step: int
    total_steps: int
    previews: tuple[PreviewImage, ...]


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    """One finished image: encoded bytes plus the seed that reproduces it alone."""

    index: int
    data: bytes
    format: str
    width: int
    height: int
    seed: int

    def save(self, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(self.data)


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where the request's time went, in seconds."""

    queue: float
    prepare: float
    denoise: float
    decode: float
    encode: float
    total: float
    preview: float


@dataclasses.dataclass(frozen=True)
class Result:
    """The images and the parameters they were made with (defaults resolved)."""

    images: tuple[GeneratedImage, ...]
    parameters: dict[str, object]
    timings: Timings
    request_id: str

    @property
    def image(self) -> GeneratedImage:
        return self.images[0]


Event = Queued | Started | Progress | Result


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A model the server knows."""

    name: str
    revision: str
    state: str
    aliases: tuple[str, ...]
    tasks: tuple[str, ...]
    variant: str
    default_width: int
    default_height: int
    unet_in_channels: int
    error: str
    description: str
    inpaint_model: str
