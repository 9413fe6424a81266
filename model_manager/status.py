"""Maps ManagerError to a gRPC status with a google.rpc.Status (BadRequest field violations) in the trailers."""

from __future__ import annotations

import grpc

from model_manager.errors import ManagerError
from sdserve_core.status import pack


def rich_status(error: ManagerError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying a google.rpc.Status with BadRequest details)."""
    return pack(grpc.StatusCode[error.code], error.message, error.violations)
