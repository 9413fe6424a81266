"""Maps ManagerError to a gRPC status with a google.rpc.Status (BadRequest field violations) in the trailers."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from model_manager.errors import ManagerError

DETAILS_KEY = "grpc-status-details-bin"


def rich_status(error: ManagerError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with BadRequest details)."""
    code = grpc.StatusCode[error.code]
    metadata: tuple[tuple[str, bytes], ...] = ()
    if error.violations:
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message)
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        status.details.append(packed)
        metadata = ((DETAILS_KEY, status.SerializeToString()),)
    return code, error.message, metadata
