"""Maps request outcomes to gRPC status codes with google.rpc details (BadRequest, RetryInfo)."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

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


def rich_status(failed: Failed) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with details)."""
    code = CODES[failed.outcome]
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=failed.message)
    if failed.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in failed.violations
            ]
        )
        status.details.add().Pack(bad)
    if failed.retry_after_seconds > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(failed.retry_after_seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if not status.details:
        return code, failed.message, ()
    packed = rpc_status.to_status(status)
    metadata = tuple((str(k), v if isinstance(v, bytes) else v.encode()) for k, v in packed.trailing_metadata)
    return packed.code, packed.details, metadata


def invalid(violations: tuple[FieldViolation, ...] | list[FieldViolation]) -> Failed:
    """The INVALID_ARGUMENT outcome; the message lists the violations too, for clients without details."""
    message = "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
    return Failed(Outcome.INVALID, message, tuple(violations))
