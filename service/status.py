"""Maps request outcomes to gRPC status codes with google.rpc details (BadRequest, RetryInfo)."""

from __future__ import annotations

import grpc

from sdserve_core.status import FieldViolation, invalid_message, pack
from service.requests import Failed, Outcome

CODES: dict[Outcome, grpc.StatusCode] = {
    Outcome.OK: grpc.StatusCode.OK,
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Outcome.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.CANCELLED: grpc.StatusCode.CANCELLED,
    Outcome.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Outcome.OOM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
}


def rich_status(failed: Failed) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with details)."""
    return pack(CODES[failed.outcome], failed.message, failed.violations, failed.retry_after_seconds)


def invalid(violations: tuple[FieldViolation, ...] | list[FieldViolation]) -> Failed:
    """The INVALID_ARGUMENT outcome; the message lists the violations too, for clients without details."""
    return Failed(Outcome.INVALID, invalid_message(violations), tuple(violations))
