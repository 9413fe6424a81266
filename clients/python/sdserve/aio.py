"""asyncio client: awaitable calls that return images, and async event streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Unpack

import grpc
import grpc.aio

from sdserve import _convert
from sdserve.client import DEFAULT_MAX_MESSAGE_BYTES, channel_options, metadata, traced
from sdserve.errors import SdserveError, from_rpc_error
from sdserve.fleet import Attempts, RetryPolicy
from sdserve.types import (
    AdapterInfo,
    EditOptions,
    Event,
    GenerationOptions,
    InpaintOptions,
    ModelInfo,
    Progress,
    Result,
    Started,
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


class AsyncRetryingStream(AsyncStream):
    """An AsyncStream that sends its request again when an attempt fails with a status its policy retries, as
    sdserve.client.RetryingStream does: every attempt's events, a Retrying event between two attempts."""

    def __init__(self, attempts: Attempts):
        self._attempts = attempts
        self._wake = asyncio.Event()
        super().__init__(attempts.start())

    async def __aiter__(self) -> AsyncIterator[Event]:
        attempt = 1
        while True:
            replica: str | None = None
            try:
                async for msg in self._call:
                    ev = _convert.event(msg)
                    if isinstance(ev, Started):
                        replica = ev.replica
                    yield ev
                    if isinstance(ev, Result):
                        # Delivered: what follows (the stream's end) is never a reason to make it again.
                        async for rest in super().__aiter__():
                            yield rest
                        return
                return
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
                raise SdserveError("CANCELLED", "cancelled by the client") from None
            retry = self._attempts.next_retry(error, attempt, replica, self._cancelled)
            yield retry
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), retry.delay_seconds)
            if self._cancelled:
                raise SdserveError("CANCELLED", "cancelled by the client")
            attempt += 1
            self._call = self._attempts.start()

    def cancel(self) -> None:
        super().cancel()
        self._wake.set()


class AsyncClient:
    """An asyncio sdserve client. Use `async with` or await close(). TLS, `service_config` and `retry` (a fleet of
    replicas, docs/fleet.md) as for `sdserve.Client`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_server_name: str | None = None,
        service_config: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ):
        opts = channel_options(max_message_bytes, tls_server_name, service_config)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.DiffusionServiceStub(self._channel)
        self._metadata = metadata(api_key)
        self._retry = retry

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
        return self._stream(self._stub.Generate, req, req.params, timeout)

    def stream_edit(
        self, image: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[EditOptions]
    ) -> AsyncStream:
        req = _convert.edit_request(image, prompt, options)
        return self._stream(self._stub.Edit, req, req.params, timeout)

    def stream_inpaint(
        self, image: bytes, mask: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[InpaintOptions]
    ) -> AsyncStream:
        req = _convert.inpaint_request(image, mask, prompt, options)
        return self._stream(self._stub.Inpaint, req, req.params, timeout)

    def _stream(self, rpc: Any, req: Any, params: pb.GenerationParams, timeout: float | None) -> AsyncStream:
        """One call of `rpc`; with a retry policy, a stream that makes it again (same request id and seed)."""
        if self._retry is None:
            return AsyncStream(rpc(req, timeout=timeout, metadata=traced(self._metadata)))
        return AsyncRetryingStream(Attempts.of_call(rpc, req, params, timeout, traced(self._metadata), self._retry))

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
