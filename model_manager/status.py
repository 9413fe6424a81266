"""Maps ManagerError to a gRPC status with a google.rpc.Status (BadRequest field violations) in the trailers."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from model_manager.errors import ManagerError


def rich_status(error: ManagerError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with BadRequest details)."""
    code = grpc.StatusCode[error.code]
    if not error.violations:
        return code, error.message, ()
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message)
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )
    status.details.add().Pack(bad)
    packed = rpc_status.to_status(status)
    metadata = tuple((str(k), v if isinstance(v, bytes) else v.encode()) for k, v in packed.trailing_metadata)
    return packed.code, packed.details, metadata
