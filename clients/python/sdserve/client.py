"""Synchronous client: blocking calls that return images, and cancellable event streams."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve import _convert
from sdserve.errors import SdserveError, from_rpc_error
from sdserve.fleet import Attempts, RetryPolicy, service_config_options
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

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(
    max_message_bytes: int, tls_server_name: str | None = None, service_config: Mapping[str, Any] | None = None
) -> list[tuple[str, int | str]]:
    """Message limits raised past gRPC's 4 MiB default (result images are larger), the TLS name override, and a
    connection of the channel's own: with gRPC's process-wide subchannel pool, a channel to an address whose
    previous server went away (a restart on the same port) inherits the old connection's backoff and fails at once
    with "connection refused", and closing one channel can reset another's stream. A `service_config` (for example
    sdserve.fleet.SERVICE_CONFIG: round robin and channel retries) is applied with retries enabled."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if tls_server_name:
        # Checked against the server's certificate instead of the target's host (an address, or a name behind a proxy).
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if service_config is not None:
        options += service_config_options(service_config)
    return options


def tls_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: roots to trust (empty: the system roots) and, for mutual TLS,
    a client certificate chain and its key. Raises OSError when a file cannot be read."""

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def traced(base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`base` plus the caller's trace context (W3C `traceparent`, through OpenTelemetry's configured propagators)
    when the application traces with OpenTelemetry and a span is active. The client does not depend on
    OpenTelemetry and never imports it first: without it, or before the application loads it, calls carry `base`."""
    if "opentelemetry.context" not in sys.modules:
        return base
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return base
    if not trace.get_current_span().get_span_context().is_valid:
        return base
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return base + tuple(carrier.items())


class Stream:
    """Iterates a call's events; `cancel()` (or leaving a `with` block early) cancels the call."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> Iterator[Event]:
        try:
            for msg in self._call:
                yield _convert.event(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self, on_progress: Callable[[Progress], None] | None = None) -> Result:
        """Consumes the stream and returns the result, calling `on_progress` for each step."""
        for ev in self:
            if isinstance(ev, Progress) and on_progress is not None:
                on_progress(ev)
            elif isinstance(ev, Result):
                return ev
        raise SdserveError("UNKNOWN", "the stream ended without a result")


class RetryingStream(Stream):
    """A Stream that sends its request again when an attempt fails with a status its policy retries
    (sdserve.fleet.Attempts: how to start an attempt, the RetryPolicy, the deadline of them all, the request id and
    seed): the events of every attempt in order, with a Retrying event between two attempts."""

    def __init__(self, attempts: Attempts):
        self._attempts = attempts
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        super().__init__(attempts.start())

    def __iter__(self) -> Iterator[Event]:
        attempt = 1
        while True:
            replica: str | None = None
            try:
                for msg in self._call:
                    ev = _convert.event(msg)
                    if isinstance(ev, Started):
                        replica = ev.replica
                    yield ev
                    if isinstance(ev, Result):
                        # Delivered: what follows (the stream's end) is never a reason to make it again.
                        yield from super().__iter__()
                        return
                return
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            retry = self._attempts.next_retry(error, attempt, replica, self._cancelled.is_set())
            yield retry
            if self._cancelled.wait(retry.delay_seconds):
                raise SdserveError("CANCELLED", "cancelled by the client")
            attempt += 1
            with self._lock:
                self._call = self._attempts.start()
            if self._cancelled.is_set():
                self._call.cancel()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            self._call.cancel()


class Client:
    """A blocking sdserve client. Use as a context manager or call close().

    `credentials` (for example `tls_credentials(ca_file)`) make the channel TLS; `tls_server_name` is the name
    checked in the server's certificate when it differs from the target's host.

    For a fleet of replicas (docs/fleet.md): a target that resolves to all of them (`dns:///NAME:PORT` of a headless
    Service, or `sdserve.fleet.fleet_target([...])`), `service_config=sdserve.fleet.SERVICE_CONFIG` (round robin over
    them; the channel retries UNAVAILABLE before a stream starts) and `retry=RetryPolicy()` (Generate, Edit and
    Inpaint streams that fail UNAVAILABLE, started or not, go again with the same request id and seed). Without
    them the client behaves as it always has. `service_config` applies to a channel the client makes, not to a
    `channel` given to it."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        tls_server_name: str | None = None,
        service_config: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ):
        if channel is not None and service_config is not None:
            raise ValueError("service_config applies to a channel the client makes: set it on the given channel")
        opts = channel_options(max_message_bytes, tls_server_name, service_config)
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials, options=opts)
                if credentials is not None
                else grpc.insecure_channel(target, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.DiffusionServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metadata = metadata(api_key)
        self._retry = retry

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Streams -----------------------------------------------------------------------------------

    def stream_generate(
        self, prompt: str, *, timeout: float | None = None, **options: Unpack[GenerationOptions]
    ) -> Stream:
        """Text-to-image as a stream of Queued, Started, Progress and Result events. `adapters` (LoRAs for this
        request: names, (name, scale) pairs or a mapping) are checked before the call; a bad one raises ValueError.
        With the client's `retry` policy, an attempt that fails with a retried status is followed by a Retrying
        event and the next attempt's events (Queued, Started, Progress from step 1 again, ...)."""
        req = pb.GenerateRequest(params=_convert.params(prompt, options))
        return self._stream(self._stub.Generate, req, req.params, timeout)

    def stream_edit(
        self, image: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[EditOptions]
    ) -> Stream:
        """Image-to-image as a stream of events. `strength` in (0, 1]; default 0.8."""
        req = _convert.edit_request(image, prompt, options)
        return self._stream(self._stub.Edit, req, req.params, timeout)

    def stream_inpaint(
        self, image: bytes, mask: bytes, prompt: str, *, timeout: float | None = None, **options: Unpack[InpaintOptions]
    ) -> Stream:
        """Inpainting as a stream of events. Mask white (255) = repaint."""
        req = _convert.inpaint_request(image, mask, prompt, options)
        return self._stream(self._stub.Inpaint, req, req.params, timeout)

    def _stream(self, rpc: Any, req: Any, params: pb.GenerationParams, timeout: float | None) -> Stream:
        """One call of `rpc`; with a retry policy, a stream that makes it again (same request id and seed)."""
        if self._retry is None:
            return Stream(rpc(req, timeout=timeout, metadata=traced(self._metadata)))
        return RetryingStream(Attempts.of_call(rpc, req, params, timeout, traced(self._metadata), self._retry))

    # Blocking helpers --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[GenerationOptions],
    ) -> Result:
        """Text-to-image; returns the finished images. With the client's `retry` policy, after any retries
        (`on_progress` then sees each attempt's steps)."""
        return self.stream_generate(prompt, timeout=timeout, **options).result(on_progress)

    def edit(
        self,
        image: bytes,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[EditOptions],
    ) -> Result:
        """Image-to-image; returns the finished images."""
        return self.stream_edit(image, prompt, timeout=timeout, **options).result(on_progress)

    def inpaint(
        self,
        image: bytes,
        mask: bytes,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[InpaintOptions],
    ) -> Result:
        """Inpainting; returns the finished images."""
        return self.stream_inpaint(image, mask, prompt, timeout=timeout, **options).result(on_progress)

    # Info --------------------------------------------------------------------------------------

    def list_models(self, timeout: float | None = 30.0) -> tuple[list[ModelInfo], str]:
        """The served models and the default model's name."""
        try:
            resp = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=traced(self._metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return [_convert.model_info(m) for m in resp.models], resp.default_model

    def server_info(self, timeout: float | None = 30.0) -> pb.GetServerInfoResponse:
        """Device, versions, schedulers, limits (`limits.max_adapters` among them) and the adapters (the protobuf
        message, for all its fields)."""
        try:
            return self._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout, metadata=traced(self._metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def list_adapters(self, timeout: float | None = 30.0) -> tuple[list[AdapterInfo], int]:
        """The adapters requests may name (GetServerInfo's `adapters`) and the most one request may use."""
        info = self.server_info(timeout)
        return [_convert.adapter_info(a) for a in info.adapters], info.limits.max_adapters

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status of `service` ('' is readiness, 'liveness' the process): SERVING, NOT_SERVING, ..."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=traced(self._metadata)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
