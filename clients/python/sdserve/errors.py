"""The client's error type: the gRPC status plus decoded field violations and retry delay."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """A bad field of the request and the rule it broke."""

    field: str
    description: str


class SdserveError(Exception):
    """A failed call. `code` is the gRPC status code name, e.g. "INVALID_ARGUMENT"."""

    def __init__(
        self,
        code: str,
        message: str,
        violations: tuple[FieldViolation, ...] = (),
        retry_after_seconds: float | None = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.violations = violations
        self.retry_after_seconds = retry_after_seconds

    def one_line(self) -> str:
        """A single line for a terminal: the first field violation if any, else the message."""
        if self.violations:
            v = self.violations[0]
            more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
            return f"{v.field}: {v.description}{more}"
        return f"{self.code}: {self.message}"


def from_rpc_error(err: grpc.RpcError) -> SdserveError:
    """Decodes a grpc.RpcError (sync or aio) into an SdserveError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    violations: list[FieldViolation] = []
    retry: float | None = None
    trailers: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for item in trailers or ():
        key, value = item[0], item[1]
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = info.retry_delay.ToNanoseconds() / 1e9
    return SdserveError(code.name if code else "UNKNOWN", message or "", tuple(violations), retry)
