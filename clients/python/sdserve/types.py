"""Typed results and events the client returns (frozen dataclasses, not protobuf messages)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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
# How a refiner takes over: "latent_handoff" (the base model's undecoded latents, the default) or "image".
RefinerModeName = Literal["latent_handoff", "image"]
# exact: the pipeline as diffusers runs it, bit for bit; fast: the model's measured execution profile.
PrecisionName = Literal["exact", "fast"]
# The denoising pass a progress step belongs to; "" from servers before passes existed (the only pass).
DenoisePassName = Literal["", "base", "refiner"]
# What an adapter changes: a LoRA or a textual-inversion embedding; "" for a kind newer than this client.
AdapterKindName = Literal["lora", "textual_inversion", ""]
# Adapters for one request: names (scale 1), (name, scale) pairs, or a mapping name -> scale. A scale of None
# means the server's default, 1. Scales are -4 to 4; each name at most once.
AdapterSpec = Sequence[str | tuple[str, float | None]] | Mapping[str, float | None]
# The contract's bounds for an adapter's scale.
MAX_ADAPTER_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class ImageSize:
    """A size in pixels, 1 to 16384 per side (SDXL micro-conditioning)."""

    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class CropOffset:
    """The top-left corner of a crop in pixels, 0 to 16384 (SDXL micro-conditioning)."""

    top: int = 0
    left: int = 0


@dataclasses.dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning as a request resolved it (defaults filled in by the server)."""

    original_size: ImageSize | None = None
    crops_coords_top_left: CropOffset | None = None
    target_size: ImageSize | None = None
    negative_original_size: ImageSize | None = None
    negative_crops_coords_top_left: CropOffset | None = None
    negative_target_size: ImageSize | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None


@dataclasses.dataclass(frozen=True)
class RefinerPass:
    """The refiner pass a request ran with: the refiner's identity, its mode and their defaults filled in."""

    model: str
    revision: str
    variant: str
    mode: RefinerModeName
    # LATENT_HANDOFF: the fraction of the schedule the base model ran. IMAGE: how far the refiner moved.
    switch_at: float | None = None
    strength: float | None = None


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter that served a request (part of its served identity): a LoRA at a scale, or an embedding."""

    name: str
    kind: AdapterKindName
    # The LoRA scale it ran at (1 for an embedding).
    scale: float
    # SHA-256 (hex) of the adapter's weights file.
    sha256: str
    # Textual inversion: the token that invokes it ("" for a LoRA).
    token: str = ""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """An adapter the server can apply (GetServerInfo): requests name it in `adapters` or `<lora:NAME:SCALE>`."""

    name: str
    kind: AdapterKindName
    # The model family ("sd15", "sdxl") and base architecture (e.g. "cross_attention_dim=768") it fits.
    family: str
    base: str
    # Textual inversion: the token that invokes it.
    token: str
    sha256: str
    size_bytes: int
    # The modules it changes: "unet", "text_encoder", "text_encoder_2".
    targets: tuple[str, ...]
    # Models (by name) that hold it in memory now.
    loaded_in: tuple[str, ...]


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
    # SDXL only. The second text encoder's prompts (empty: `prompt` / `negative_prompt`).
    prompt_2: str
    negative_prompt_2: str
    # SDXL only: size and crop micro-conditioning. Unset: the output size, an uncropped image; the negative
    # ones default to the positive values (crops to (0, 0)).
    original_size: ImageSize
    target_size: ImageSize
    crops_coords_top_left: CropOffset
    negative_original_size: ImageSize
    negative_target_size: ImageSize
    negative_crops_coords_top_left: CropOffset
    # Refiner models only: the aesthetic score to aim for, 0 to 10 (server default 6.0; negative 2.5).
    aesthetic_score: float
    negative_aesthetic_score: float
    # SDXL only: a second pass with this refiner model (name or alias). Unset: no second pass.
    refiner: str
    # Needs `refiner`. Default "latent_handoff".
    refiner_mode: RefinerModeName
    # latent_handoff: the fraction of the schedule the base model runs, in (0, 1); server default 0.8.
    refiner_switch_at: float
    # image: how far the refiner moves from the base model's image, (0, 1]; server default 0.3.
    refiner_strength: float
    # LoRA adapters for this request only: names (scale 1), (name, scale) pairs or a mapping name -> scale, scales
    # -4 to 4, each name once, at most the server's limits.max_adapters. Checked here before the call (ValueError).
    # Inline `<lora:NAME:SCALE>` tags in the prompts are added by the server.
    adapters: AdapterSpec
    # "exact" or "fast" (default: the server's `precision` setting, normally fast); see Started.execution_profile.
    precision: PrecisionName


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
    # The refiner that runs the second pass ("" without one): name, revision and stored weights variant.
    refiner_model: str = ""
    refiner_model_revision: str = ""
    refiner_model_variant: str = ""
    # Memory strategies the request runs with, comma-separated and sorted (e.g. "vae_tiling"), or "none".
    memory_strategy: str = ""
    # The adapters serving the request (LoRAs with their scales, embeddings the prompts use), sorted by name.
    adapters: tuple[ResolvedAdapter, ...] = ()
    # The execution profile it runs in: "exact", or levers joined by "+" (e.g. "bf16-autocast+channels-last").
    execution_profile: str = ""
    # The model name or alias the request named (the server's default when it named none); with a canary alias,
    # `model` is the target this request got.
    requested_model: str = ""
    # The replica (server process) running it: the server's `replica` setting, by default its host name (the pod
    # name in Kubernetes); "" from servers before fleets. See docs/fleet.md.
    replica: str = ""


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
    # "base", or "refiner" for the second pass of a request with a refiner; `step` and `total_steps` count
    # within the pass.
    denoise_pass: DenoisePassName = ""


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
    # The refiner pass (None without one) and the SDXL micro-conditioning (None for other families) it ran
    # with, defaults filled in; the memory strategies used, as in Started.memory_strategy.
    refiner: RefinerPass | None = None
    conditioning: MicroConditioning | None = None
    memory_strategy: str = ""
    # The adapters it ran with, as in Started.adapters (also under parameters["adapters"]).
    adapters: tuple[ResolvedAdapter, ...] = ()
    # The execution profile it ran in, as in Started.execution_profile.
    execution_profile: str = ""
    # The replica that served it, as in Started.replica (also under parameters["replica"]).
    replica: str = ""

    @property
    def image(self) -> GeneratedImage:
        return self.images[0]


@dataclasses.dataclass(frozen=True)
class Retrying:
    """An attempt failed with a status the client's RetryPolicy retries; the same request (same request id, same
    seed, so the same image) goes again after `delay_seconds`. Only streams of a client with `retry=` send it."""

    # The attempt that failed, from 1, and the most the policy makes.
    attempt: int
    max_attempts: int
    # The status it failed with, e.g. "UNAVAILABLE".
    code: str
    message: str
    # Whether the failed attempt had started on a replica (a Started event came), and which replica that was.
    started: bool
    replica: str
    delay_seconds: float
    # What every attempt sends, fixed before the first one.
    request_id: str
    seed: int


Event = Queued | Started | Progress | Result | Retrying


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
    # "sd15" (SD 1.x and 2.x layouts) or "sdxl" (SDXL base, refiner and inpainting); "" from older servers.
    family: str = ""
    # An SDXL refiner: it runs Edit and can be named as a request's `refiner`.
    refiner: bool = False
