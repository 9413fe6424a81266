"""Packs a gRPC status with google.rpc details (BadRequest field violations, RetryInfo) into trailing metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path in the request and the rule it broke."""

    field: str
    description: str


class Violation(Protocol):
    """Anything with a field path and a rule (the server's and the sidecar's violation types)."""

    @property
    def field(self) -> str: ...

    @property
    def description(self) -> str: ...


def details(violations: Sequence[Violation] = (), retry_after_seconds: float = 0.0) -> list[Message]:
    """The google.rpc detail messages of an error: BadRequest with the field violations, RetryInfo with the delay."""
    out: list[Message] = []
    if violations:
        out.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in violations
                ]
            )
        )
    if retry_after_seconds > 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_seconds * 1e9))
        out.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return out


def pack(
    code: grpc.StatusCode, message: str, violations: Sequence[Violation] = (), retry_after_seconds: float = 0.0
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with details); no details: empty metadata."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details(violations, retry_after_seconds):
        status.details.add().Pack(detail)
    if not status.details:
        return code, message, ()
    packed = rpc_status.to_status(status)
    metadata = tuple((str(k), v if isinstance(v, bytes) else v.encode()) for k, v in packed.trailing_metadata)
    return packed.code, packed.details, metadata


def invalid_message(violations: Sequence[Violation]) -> str:
    """The INVALID_ARGUMENT message; it lists the violations too, for clients without details."""
    return "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
