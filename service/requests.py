"""Frozen request and event types used inside the server (protobuf stops at validation.py and convert.py)."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from PIL import Image

from sdserve_core.pipeline.call import Conditioning
from sdserve_core.prompts import PromptInputs
from sdserve_core.status import FieldViolation
from sdserve_core.tasks import Task

__all__ = [
    "ConditioningSpec",
    "Event",
    "Failed",
    "GenerationRequest",
    "InpaintArea",
    "InpaintSpec",
    "Outcome",
    "OutputSpec",
    "PreviewImage",
    "PreviewMode",
    "PreviewSpec",
    "Progress",
    "Queued",
    "RefinerMode",
    "RefinerSpec",
    "ResolvedRefiner",
    "ResolvedRequest",
    "Result",
    "ResultImage",
    "ServedIdentity",
    "Started",
    "Task",
    "Timings",
]


class PreviewMode(enum.Enum):
    """How previews are made."""

    NONE = "none"
    LATENT_RGB = "latent_rgb"
    FULL_VAE = "full_vae"


class InpaintArea(enum.Enum):
    """Which part of the image an inpaint works on."""

    WHOLE_IMAGE = "whole_image"
    MASK_ONLY = "mask_only"


@dataclasses.dataclass(frozen=True)
class PreviewSpec:
    """Preview options with defaults filled in."""

    mode: PreviewMode = PreviewMode.NONE
    every_n_steps: int = 1
    max_edge: int = 0  # 0: the output's longest edge, at most previews.DEFAULT_MAX_EDGE
    format: str = "jpeg"
    quality: int = 75


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Result encoding with defaults filled in."""

    format: str = "png"
    quality: int = 90
    embed_parameters: bool = True


@dataclasses.dataclass(frozen=True)
class InpaintSpec:
    """The inpaint-only inputs."""

    mask: Image.Image
    mask_blur: int = 0
    invert_mask: bool = False
    area: InpaintArea = InpaintArea.WHOLE_IMAGE
    mask_padding: int = 32
    preserve_unmasked: bool = False


# (width, height) of a size, (top, left) of a crop offset, in pixels.
Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ConditioningSpec:
    """SDXL micro-conditioning as sent (None: the default, filled in by bind)."""

    original_size: Size | None = None
    crops_coords_top_left: Size | None = None
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def is_empty(self) -> bool:
        return self == ConditioningSpec()


class RefinerMode(enum.Enum):
    """How a refiner takes over from the base model."""

    LATENT_HANDOFF = "latent_handoff"
    IMAGE = "image"


@dataclasses.dataclass(frozen=True)
class RefinerSpec:
    """A refiner pass as sent."""

    model: str
    mode: RefinerMode = RefinerMode.LATENT_HANDOFF
    switch_at: float | None = None
    strength: float | None = None


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """A validated request as the caller sent it; defaults that depend on the model are still open."""

    task: Task
    model: str
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    scheduler: str = ""
    seed: int | None = None
    num_images: int = 1
    clip_skip: int = 0
    preview: PreviewSpec = PreviewSpec()
    output: OutputSpec = OutputSpec()
    request_id: str = ""
    max_queue_seconds: float = 0.0
    image: Image.Image | None = None
    strength: float | None = None
    inpaint: InpaintSpec | None = None
    prompt_2: str = ""
    negative_prompt_2: str = ""
    conditioning: ConditioningSpec = ConditioningSpec()
    refiner: RefinerSpec | None = None
    # LoRAs asked for: params.adapters, then the prompts' <lora:NAME:SCALE> tags (removed from the texts above).
    adapters: tuple[AdapterRequest, ...] = ()
    # "fast" (the model's execution profile) or "exact"; the server's default already applied.
    precision: str = "fast"


@dataclasses.dataclass(frozen=True)
class AdapterRequest:
    """One LoRA a request names: its name, scale, and the field that named it (for errors)."""

    name: str
    scale: float
    field: str


@dataclasses.dataclass(frozen=True)
class AdapterUse:
    """One adapter that serves a request (a LoRA at a scale, or an embedding whose token a prompt uses): with the
    model's ServedIdentity, the served identity. Equal uses are the same weights (by sha256) at the same scale."""

    name: str
    # "lora" or "textual_inversion" (sdserve_core.adapter_file.KINDS).
    kind: str
    scale: float
    sha256: str
    # Textual inversion: the token ("" for a LoRA).
    token: str = ""
    # The components it changes: "unet", "text_encoder", "text_encoder_2".
    targets: tuple[str, ...] = ()
    weights: Path = dataclasses.field(default=Path(), compare=False)

    @property
    def lora(self) -> bool:
        return self.kind == "lora"

    @property
    def touches_text(self) -> bool:
        """Whether it changes what the text encoders compute (so the prompt cache keys on it)."""
        return not self.lora or any(t.startswith("text_encoder") for t in self.targets)


@dataclasses.dataclass(frozen=True)
class ServedIdentity:
    """Exactly which weights serve a request: everything that keys on a model keys on this one value
    (batching, the prompt cache, the batch policy, events, logs and metrics)."""

    model: str
    revision: str
    # The stored weights: fp32, fp16, bf16 or int8 (weight-only; computed in the server's dtype).
    variant: str
    # The registry slot holding these weights (folder name, or NAME@REVISION:VARIANT for store variants).
    slot: str

    def label(self) -> str:
        return f"{self.model}@{self.revision[:12]}:{self.variant}"


@dataclasses.dataclass(frozen=True)
class ResolvedRefiner:
    """The refiner pass that runs: its weights, mode and defaults filled in. With LATENT_HANDOFF the base model
    denoises until `switch_at` of the schedule and the refiner from there; with IMAGE the refiner runs Edit on the
    base model's image at `strength`."""

    identity: ServedIdentity
    mode: RefinerMode
    switch_at: float
    strength: float


@dataclasses.dataclass(frozen=True)
class ResolvedRequest:
    """A request bound to a model with every default filled in: what actually runs."""

    request: GenerationRequest
    identity: ServedIdentity
    width: int
    height: int
    steps: int
    guidance_scale: float
    # Build key: a schedulers.SCHEDULERS name, or "" for the model's own config unchanged.
    scheduler: str
    # Display name (never empty) and diffusers class.
    scheduler_name: str
    scheduler_class: str
    seeds: tuple[int, ...]
    strength: float
    request_id: str
    device: str
    dtype: str
    # The model's family (sdserve_core.families), SDXL's micro-conditioning (None for other families) and the
    # refiner pass (None without one).
    family: str = "sd15"
    conditioning: Conditioning | None = None
    refiner: ResolvedRefiner | None = None
    # Memory strategies the call runs with (sorted names joined by commas, or "none").
    memory_strategy: str = "none"
    # The adapters that serve it, sorted by name (LoRAs and the embeddings its prompts use).
    adapters: tuple[AdapterUse, ...] = ()
    # Text-encoder chunks the longest of its prompts needs (prompts beyond one window are encoded in chunks):
    # embeddings of different lengths cannot share a pipeline call.
    prompt_chunks: int = 1
    # "fast" or "exact" (from the request); the execution profile it runs in is set when its batch starts.
    precision: str = "fast"
    execution_profile: str = "exact"
    # The model name or alias the request named (the server's default when it named none).
    requested_model: str = ""

    @property
    def prompt_inputs(self) -> PromptInputs:
        """The prompt texts and clip skip, as the text encoders take them."""
        r = self.request
        embeddings = tuple((u.token, u.sha256) for u in self.adapters if not u.lora)
        return PromptInputs(r.prompt, r.negative_prompt, r.prompt_2, r.negative_prompt_2, r.clip_skip, embeddings)

    @property
    def task(self) -> Task:
        return self.request.task

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def model_revision(self) -> str:
        return self.identity.revision

    @property
    def variant(self) -> str:
        return self.identity.variant

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call."""
        inpaint = self.request.inpaint
        return (
            self.task,
            self.identity,
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.scheduler,
            self.strength,
            self.request.clip_skip,
            self.conditioning,
            self.refiner,
            self.adapters,
            self.prompt_chunks,
            self.precision,
            # Cropped inpaints work on a per-request region, so they never share a call.
            None if inpaint is None else (inpaint.area, id(inpaint) if inpaint.area is InpaintArea.MASK_ONLY else 0),
        )


@dataclasses.dataclass(frozen=True)
class Queued:
    """The request waits; `position` requests are ahead of it."""

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
    model_variant: str = ""
    dtype: str = ""
    refiner: ServedIdentity | None = None
    memory_strategy: str = "none"
    adapters: tuple[AdapterUse, ...] = ()
    execution_profile: str = "exact"
    requested_model: str = ""


@dataclasses.dataclass(frozen=True)
class PreviewImage:
    """An encoded preview of one image."""

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
    previews: tuple[PreviewImage, ...] = ()
    # "base", or "refiner" in the refiner pass of a request with one; step and total_steps count within the pass.
    denoise_pass: str = "base"


@dataclasses.dataclass(frozen=True)
class ResultImage:
    """An encoded result image."""

    index: int
    data: bytes
    format: str
    width: int
    height: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds."""

    queue: float = 0.0
    prepare: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    encode: float = 0.0
    total: float = 0.0
    preview: float = 0.0


@dataclasses.dataclass(frozen=True)
class Result:
    """The finished request."""

    images: tuple[ResultImage, ...]
    resolved: ResolvedRequest
    timings: Timings


class Outcome(enum.Enum):
    """How a request ended; also the `outcome` metric label."""

    OK = "ok"
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    OVERLOADED = "overloaded"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    OOM = "oom"
    UNAVAILABLE = "unavailable"
    # Refused by the API-key check before the servicer saw it (counted, never a Failed event).
    UNAUTHENTICATED = "unauthenticated"
    INTERNAL = "internal"


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request ended without a result."""

    outcome: Outcome
    message: str
    violations: tuple[FieldViolation, ...] = ()
    retry_after_seconds: float = 0.0


Event = Queued | Started | Progress | Result | Failed
