"""asyncio client: awaitable calls that return images, and async event streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Unpack

import grpc
import grpc.aio

from sdserve import _convert
from sdserve.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options, metadata, traced
from sdserve.errors import SdserveError, from_rpc_error
from sdserve.types import (
    AdapterInfo,
    EditOptions,
    Event,
    GenerationOptions,
    InpaintOptions,
    ModelInfo,
    Progress,
    Result,
)
from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc


class AsyncStream:
    """Async-iterates a call's events; `cancel()` cancels the call."""

    def __init__(self, call: Any):
        self._call = call
        self._cancelled = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for msg in self._call:
                yield _convert.event(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError for a call cancelled with cancel(); report it like the sync client.
            # A cancellation of the surrounding task is not ours to translate.
            if not self._cancelled:
                raise
            raise SdserveError("CANCELLED", "cancelled by the client") from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def result(self, on_progress: Callable[[Progress], None] | None = None) -> Result:
        """Consumes the stream and returns the result, calling `on_progress` for each step."""
        async for ev in self:
            if isinstance(ev, Progress) and on_progress is not None:
                on_progress(ev)
            elif isinstance(ev, Result):
                return ev
        raise SdserveError("UNKNOWN", "the stream ended without a result")


class AsyncClient:
    """An asyncio sdserve client. Use `async with` or await close(). TLS as for `sdserve.Client`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_server_name: str | None = None,
    ):
        opts = channel_options(max_message_bytes, tls_server_name)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.DiffusionServiceStub(self._channel)
        self._metadata = metadata(api_key)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stream_generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerationOptions]
    ) -> AsyncStream:
        req = pb.GenerateRequest(params=_convert.params(prompt, options))
        return AsyncStream(self._stub.Generate(req, timeout=timeout, metadata=traced(self._metadata)))

    def stream_edit(
        self, image: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[EditOptions]
    ) -> AsyncStream:
        req = _convert.edit_request(image, prompt, options)
        return AsyncStream(self._stub.Edit(req, timeout=timeout, metadata=traced(self._metadata)))

    def stream_inpaint(
        self, image: bytes, mask: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[InpaintOptions]
    ) -> AsyncStream:
        req = _convert.inpaint_request(image, mask, prompt, options)
        return AsyncStream(self._stub.Inpaint(req, timeout=timeout, metadata=traced(self._metadata)))

    async def generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerationOptions]
    ) -> Result:
        return await self.stream_generate(prompt, timeout=timeout, **options).result()

    async def edit(
        self, image: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[EditOptions]
    ) -> Result:
        return await self.stream_edit(image, prompt, timeout=timeout, **options).result()

    async def inpaint(
        self, image: bytes, mask: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[InpaintOptions]
    ) -> Result:
        return await self.stream_inpaint(image, mask, prompt, timeout=timeout, **options).result()

    async def list_models(self, timeout: float | None = 30.0) -> tuple[list[ModelInfo], str]:
        try:
            resp = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=traced(self._metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return [_convert.model_info(m) for m in resp.models], resp.default_model

    async def server_info(self, timeout: float | None = 30.0) -> pb.GetServerInfoResponse:
        """Device, versions, schedulers, limits and adapters, as `Client.server_info`."""
        try:
            response: pb.GetServerInfoResponse = await self._stub.GetServerInfo(
                pb.GetServerInfoRequest(), timeout=timeout, metadata=traced(self._metadata)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return response

    async def list_adapters(self, timeout: float | None = 30.0) -> tuple[list[AdapterInfo], int]:
        """The adapters requests may name and the most one request may use, as `Client.list_adapters`."""
        info = await self.server_info(timeout)
        return [_convert.adapter_info(a) for a in info.adapters], info.limits.max_adapters
