"""The client's error type: the gRPC status plus decoded field violations and retry delay."""

from __future__ import annotations

import dataclasses

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


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


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailers (grpc-status-details-bin), or None. A status whose code or message
    disagrees with the call's is ignored rather than trusted."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return None
    return status


def from_rpc_error(err: grpc.RpcError) -> SdserveError:
    """Decodes a grpc.RpcError (sync or aio) into an SdserveError."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    violations: list[FieldViolation] = []
    retry: float | None = None
    status = _rich_status(err) if hasattr(err, "trailing_metadata") else None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return SdserveError(code.name if code else "UNKNOWN", message or "", tuple(violations), retry)
