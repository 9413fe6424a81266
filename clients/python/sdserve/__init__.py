"""sdserve Python client: typed sync and asyncio clients for the sdserve.v1 DiffusionService."""

from sdserve.aio import AsyncClient, AsyncStream
from sdserve.client import Client, Stream
from sdserve.errors import FieldViolation, SdserveError
from sdserve.fleet import SERVICE_CONFIG, RetryPolicy, fleet_target
from sdserve.types import (
    AdapterInfo,
    AdapterSpec,
    CropOffset,
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
    RefinerPass,
    ResolvedAdapter,
    Result,
    Retrying,
    Started,
    Timings,
)

__all__ = [
    "SERVICE_CONFIG",
    "AdapterInfo",
    "AdapterSpec",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "CropOffset",
    "EditOptions",
    "Event",
    "FieldViolation",
    "GeneratedImage",
    "GenerationOptions",
    "ImageSize",
    "InpaintOptions",
    "MicroConditioning",
    "ModelInfo",
    "PreviewImage",
    "Progress",
    "Queued",
    "RefinerPass",
    "ResolvedAdapter",
    "Result",
    "RetryPolicy",
    "Retrying",
    "SdserveError",
    "Started",
    "Stream",
    "Timings",
    "fleet_target",
]
__version__ = "0.1.0"
