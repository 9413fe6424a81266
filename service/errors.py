"""The server's error hierarchy and the one mapping from any exception to a request's outcome."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sdserve_core.status import FieldViolation, invalid_message
from service.requests import Failed, Outcome


class ServiceError(Exception):
    """A failure the caller is told about: its outcome (and so its gRPC status), message and details."""

    outcome = Outcome.INTERNAL
    retry_after_seconds = 0.0

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()):
        super().__init__(message)
        self.message = message
        self.violations = tuple(violations)

    def failed(self) -> Failed:
        """The terminal event this error ends a request with."""
        return Failed(self.outcome, self.message, self.violations, self.retry_after_seconds)


class InvalidRequest(ServiceError):
    """The request broke one or more rules (of the contract or of the model); each violation names the field."""

    outcome = Outcome.INVALID

    def __init__(self, violations: Iterable[FieldViolation]):
        found = tuple(violations)
        super().__init__(invalid_message(found), found)


class ModelNotFound(ServiceError, LookupError):
    """No model or alias has this name."""

    outcome = Outcome.NOT_FOUND

    def __init__(self, name: str, field: str = ""):
        named = f"{field}: model" if field else "model"
        super().__init__(f"{named} {name!r} not found; ListModels shows what is served")
        self.name = name


class ModelUnusable(ServiceError):
    """The model exists but cannot serve (its load failed, its files are bad, or it is the wrong kind)."""

    outcome = Outcome.FAILED_PRECONDITION


class Overloaded(ServiceError):
    """The model's queue is full, or the queue is closed."""

    outcome = Outcome.OVERLOADED
    retry_after_seconds = 1.0

    def __init__(self, reason: str):
        super().__init__(f"queue full: {reason}")


class Draining(ServiceError):
    """The server stopped admitting work."""

    outcome = Outcome.UNAVAILABLE

    def __init__(self) -> None:
        super().__init__("the server is draining; retry on another replica")


OUT_OF_MEMORY = Failed(
    Outcome.OOM, "out of device memory: the request did not fit; retry with fewer or smaller images", (), 1.0
)
INTERNAL = Failed(Outcome.INTERNAL, "internal error")


def is_oom(exc: BaseException) -> bool:
    """Device out-of-memory: torch's OutOfMemoryError (CUDA, XPU) or a failed CPU/MPS allocation."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def to_failed(exc: BaseException) -> Failed:
    """The one mapping from an exception to how the request ends; anything unexpected is INTERNAL (the caller logs
    it with its traceback; the client sees no internals)."""
    if isinstance(exc, ServiceError):
        return exc.failed()
    if is_oom(exc):
        return OUT_OF_MEMORY
    return INTERNAL
