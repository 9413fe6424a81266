"""What a generation call needs from its transport: the time left and a way to end with a mapped error.

gRPC, Connect / gRPC-Web and the A1111 REST edge each wrap their own call object in one of these, so the servicer's
request logic (validate, queue, stream, account) runs once for every transport."""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

import grpc

from service import status
from service.requests import Failed


class CallContext(Protocol):
    """One call as the servicer sees it, whatever carried it."""

    @property
    def transport(self) -> str:
        """The metric and log label of the transport: grpc, connect, grpc-web or a1111."""
        ...

    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline; None when it set none."""
        ...

    async def fail(self, failed: Failed) -> NoReturn:
        """Ends the call with `failed` mapped onto the transport's status (never returns)."""
        ...


class GrpcCall:
    """A grpc.aio servicer context: errors become a status with google.rpc details in the trailers."""

    transport = "grpc"

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]):
        self._context = context

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    async def fail(self, failed: Failed) -> NoReturn:
        code, message, metadata = status.rich_status(failed)
        await self._context.abort(code, message, trailing_metadata=metadata)
        raise AssertionError("grpc's abort returned")  # pragma: no cover - abort always raises
