"""sdserve Python client: typed sync and asyncio clients for the sdserve.v1 DiffusionService."""

from sdserve.aio import AsyncClient, AsyncStream
from sdserve.client import Client, Stream
from sdserve.errors import FieldViolation, SdserveError
from sdserve.types import (
    EditOptions,
    Event,
    GeneratedImage,
    GenerationOptions,
    InpaintOptions,
    ModelInfo,
    PreviewImage,
    Progress,
    Queued,
    Result,
    Started,
    Timings,
)

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Client",
    "EditOptions",
    "Event",
    "FieldViolation",
    "GeneratedImage",
    "GenerationOptions",
    "InpaintOptions",
    "ModelInfo",
    "PreviewImage",
    "Progress",
    "Queued",
    "Result",
    "SdserveError",
    "Started",
    "Stream",
    "Timings",
]
__version__ = "0.1.0"
