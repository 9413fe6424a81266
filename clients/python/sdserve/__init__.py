"""sdserve Python client: typed sync and asyncio clients for the sdserve.v1 DiffusionService."""

from sdserve.aio import AsyncClient, AsyncStream
from sdserve.client import Client, Stream
from sdserve.errors import FieldViolation, SdserveError
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
    Started,
    Timings,
)

__all__ = [
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
    "SdserveError",
    "Started",
    "Stream",
    "Timings",
]
__version__ = "0.1.0"
