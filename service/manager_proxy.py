"""The model manager's read-only RPCs over the HTTP port: forwarded to the sidecar this server follows over gRPC.

Writes (pull, import, delete, aliases) stay on the sidecar's own gRPC port, where its keys and network policy
guard them; over HTTP they answer UNIMPLEMENTED."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf.any_pb2 import Any as AnyPb
from google.rpc import status_pb2

from sdserve.client import tls_credentials
from sdserve.v1 import model_manager_pb2 as mpb
from sdserve.v1 import model_manager_pb2_grpc as mpb_grpc
from sdserve.v1.model_manager_connect import ModelManagerService
from service.connect_edge import connect_code
from service.settings import Settings

T = TypeVar("T")


def _details(err: grpc.aio.AioRpcError) -> list[AnyPb]:
    metadata: Any = err.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []


def _forward_headers(ctx: RequestContext[Any, Any], api_key: str) -> tuple[tuple[str, str], ...]:
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    rid = ctx.request_headers().get("x-request-id", "")
    return (*metadata, ("x-request-id", rid)) if rid else metadata


class ManagerProxy(ModelManagerService):
    """ListStoredModels, GetStoredModel, ListAdapters, GetAdapter and WatchModels, asked of the sidecar."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        # grpc-stubs types generated stubs as synchronous; on an aio channel they return awaitables and async
        # iterators, so the stub is Any here.
        self._stub: Any = None

    def _connect(self) -> Any:
        s = self._settings
        if not s.manager_target:
            raise ConnectError(
                Code.FAILED_PRECONDITION, "this server follows no model manager (--manager-target is empty)"
            )
        if self._stub is None:
            options = [("grpc.max_receive_message_length", s.max_message_bytes)]
            target = s.manager_target
            if s.manager_ca_file or s.manager_client_cert_file:
                creds = tls_credentials(s.manager_ca_file, s.manager_client_cert_file, s.manager_client_key_file)
                self._channel = grpc.aio.secure_channel(target, creds, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            self._stub = mpb_grpc.ModelManagerServiceStub(self._channel)
        return self._stub

    async def _unary(self, call: Callable[..., Awaitable[T]], request: Any, ctx: RequestContext[Any, Any]) -> T:
        timeout = ctx.timeout_ms()
        try:
            return await call(
                request,
                metadata=_forward_headers(ctx, self._settings.manager_api_key),
                timeout=None if timeout is None else timeout / 1000.0,
            )
        except grpc.aio.AioRpcError as err:
            raise ConnectError(connect_code(err.code()), err.details() or "", _details(err)) from None

    async def list_stored_models(
        self, request: mpb.ListStoredModelsRequest, ctx: RequestContext[Any, Any]
    ) -> mpb.ListStoredModelsResponse:
        return await self._unary(self._connect().ListStoredModels, request, ctx)

    async def get_stored_model(
        self, request: mpb.GetStoredModelRequest, ctx: RequestContext[Any, Any]
    ) -> mpb.GetStoredModelResponse:
        return await self._unary(self._connect().GetStoredModel, request, ctx)

    async def list_adapters(
        self, request: mpb.ListAdaptersRequest, ctx: RequestContext[Any, Any]
    ) -> mpb.ListAdaptersResponse:
        return await self._unary(self._connect().ListAdapters, request, ctx)

    async def get_adapter(
        self, request: mpb.GetAdapterRequest, ctx: RequestContext[Any, Any]
    ) -> mpb.GetAdapterResponse:
        return await self._unary(self._connect().GetAdapter, request, ctx)

    async def watch_models(
        self, request: mpb.WatchModelsRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[mpb.WatchModelsResponse]:
        call = self._connect().WatchModels(request, metadata=_forward_headers(ctx, self._settings.manager_api_key))
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise ConnectError(connect_code(err.code()), err.details() or "", _details(err)) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
