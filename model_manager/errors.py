"""The sidecar's error types: each carries the gRPC status code name, a message and field violations."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """A bad request field and the rule it broke."""

    field: str
    description: str


class ManagerError(Exception):
    """A failure to report to the caller; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"

    def __init__(self, message: str, violations: tuple[FieldViolation, ...] = ()):
        super().__init__(message)
        self.message = message
        self.violations = violations


class InvalidArgument(ManagerError):
    code = "INVALID_ARGUMENT"


class NotFound(ManagerError):
    code = "NOT_FOUND"


class AlreadyExists(ManagerError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ManagerError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(ManagerError):
    code = "PERMISSION_DENIED"


class ResourceExhausted(ManagerError):
    code = "RESOURCE_EXHAUSTED"


class DataLoss(ManagerError):
    code = "DATA_LOSS"


class ChecksumMismatch(DataLoss):
    """A file's bytes differ from its expected size or digest."""


class BudgetExceeded(ResourceExhausted):
    """The store's budget cannot hold the operation, even after evicting what may be evicted."""


class DiskFull(ResourceExhausted):
    """The store's file system is (or would be, below --min-free-bytes) full."""


class Unavailable(ManagerError):
    code = "UNAVAILABLE"


class Cancelled(ManagerError):
    code = "CANCELLED"


class Aborted(ManagerError):
    code = "ABORTED"


def invalid(*violations: FieldViolation) -> InvalidArgument:
    """INVALID_ARGUMENT whose message also lists the violations, for clients that ignore details."""
    message = "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(message, tuple(violations))


def invalid_field(field: str, description: str) -> InvalidArgument:
    """INVALID_ARGUMENT for one field."""
    return invalid(FieldViolation(field, description))
