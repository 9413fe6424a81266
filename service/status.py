"""Maps request outcomes to gRPC status codes with google.rpc details (BadRequest, RetryInfo)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from service.requests import Failed, FieldViolation, Outcome

CODES: dict[Outcome, grpc.StatusCode] = {
    Outcome.OK: grpc.StatusCode.OK,
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Outcome.UNAVAILABLE_MODEL: grpc.StatusCode.FAILED_PRECONDITION,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.CANCELLED: grpc.StatusCode.CANCELLED,
    Outcome.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Outcome.OOM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.INTERNAL: grpc.StatusCode.INTERNAL,
}

DETAILS_KEY = "grpc-status-details-bin"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def rich_status(failed: Failed) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with details)."""
    code = CODES[failed.outcome]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=failed.message)
    if failed.violations:
        status.details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                        for v in failed.violations
                    ]
                )
            )
        )
    if failed.retry_after_seconds > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(failed.retry_after_seconds * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    metadata: tuple[tuple[str, bytes], ...] = ()
    if status.details:
        metadata = ((DETAILS_KEY, status.SerializeToString()),)
    return code, failed.message, metadata


def invalid(violations: tuple[FieldViolation, ...] | list[FieldViolation]) -> Failed:
    """The INVALID_ARGUMENT outcome; the message lists the violations too, for clients without details."""
    message = "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
    return Failed(Outcome.INVALID, message, tuple(violations))
