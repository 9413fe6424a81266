"""DiffusionService over Connect, gRPC-Web and JSON (connect-python), served by the same servicer as gRPC.

Each call is wrapped in a `ConnectCall`, so validation, queueing, streaming, errors, deadlines and accounting are
the servicer's own; this module only maps statuses onto Connect errors (with the same google.rpc details) and
turns an escaped exception into a generic INTERNAL, as the gRPC edge interceptor does."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from connectrpc import _codec
from connectrpc.code import Code
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.edge import Undecodable
from sdserve_core.status import FieldViolation, details, invalid_message
from service import status
from service.requests import Failed
from service.servicer import DiffusionServicer

log = logging.getLogger(__name__)

_CONNECT_CODES = {code: Code[code.name] for code in grpc.StatusCode if code.name in Code.__members__}
_CONNECT_CODES[grpc.StatusCode.CANCELLED] = Code.CANCELED


def connect_code(code: grpc.StatusCode) -> Code:
    """The Connect code of a gRPC status code."""
    return _CONNECT_CODES.get(code, Code.UNKNOWN)


def failed_error(failed: Failed) -> ConnectError:
    """A request outcome as a Connect error carrying the gRPC edge's details (BadRequest, RetryInfo)."""
    code = connect_code(status.CODES[failed.outcome])
    return ConnectError(code, failed.message, details(failed.violations, failed.retry_after_seconds))


def invalid_error(violations: list[FieldViolation]) -> ConnectError:
    """INVALID_ARGUMENT naming each bad field, as the gRPC edge answers it."""
    return ConnectError(Code.INVALID_ARGUMENT, invalid_message(violations), details(violations))


def transport_of(ctx: RequestContext[Any, Any]) -> str:
    """The metrics label of the protocol a call came in on."""
    content_type = ctx.request_headers().get("content-type", "")
    if content_type.startswith("application/grpc-web"):
        return "grpc-web"
    return "grpc" if content_type.startswith("application/grpc") else "connect"


class ConnectCall:
    """A connect-python call as the servicer's CallContext (`connect-timeout-ms` / `grpc-timeout` is the deadline)."""

    def __init__(self, ctx: RequestContext[Any, Any]):
        self._ctx = ctx
        self.transport = transport_of(ctx)

    def time_remaining(self) -> float | None:
        ms = self._ctx.timeout_ms()
        return None if ms is None else ms / 1000.0

    async def fail(self, failed: Failed) -> NoReturn:
        raise failed_error(failed)


def _request_id(request: Any, ctx: RequestContext[Any, Any]) -> str:
    rid = getattr(getattr(request, "params", None), "request_id", "")
    if isinstance(rid, str) and rid and len(rid) <= 128 and rid.isprintable():
        return rid
    header = ctx.request_headers().get("x-request-id", "")
    return header if header and len(header) <= 128 and header.isprintable() else uuid.uuid4().hex


def _internal(request: Any, ctx: RequestContext[Any, Any]) -> ConnectError:
    rid = _request_id(request, ctx)
    log.exception("unhandled error", extra={"rpc": ctx.method().name, "request_id": rid})
    return ConnectError(Code.INTERNAL, f"internal error (request id {rid}); the server log has the details")


async def _guarded(inner: AsyncIterator[Any], request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
    """`inner`'s messages; an exception that is not how a call ends becomes a generic INTERNAL."""
    try:
        async for item in inner:
            yield item
    except (ConnectError, asyncio.CancelledError, GeneratorExit):
        raise
    except Exception:
        raise _internal(request, ctx) from None
    finally:
        # Close the servicer's generator now so its cleanup (cancel the job, account the call) runs at once.
        aclose = getattr(inner, "aclose", None)
        if aclose is not None:
            await aclose()


class DiffusionConnect:
    """The generated DiffusionService protocol, answered by the gRPC servicer's transport-neutral methods."""

    def __init__(self, servicer: DiffusionServicer):
        self._servicer = servicer

    def _stream(self, rpc: str, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        return _guarded(self._servicer.stream(rpc, request, ConnectCall(ctx)), request, ctx)

    def generate(
        self, request: pb.GenerateRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        return self._stream("Generate", request, ctx)

    def edit(self, request: pb.EditRequest, ctx: RequestContext[Any, Any]) -> AsyncIterator[pb.EditResponse]:
        return self._stream("Edit", request, ctx)

    def inpaint(self, request: pb.InpaintRequest, ctx: RequestContext[Any, Any]) -> AsyncIterator[pb.InpaintResponse]:
        return self._stream("Inpaint", request, ctx)

    async def list_models(self, request: pb.ListModelsRequest, ctx: RequestContext[Any, Any]) -> pb.ListModelsResponse:
        try:
            return self._servicer.model_list()
        except Exception:
            raise _internal(request, ctx) from None

    async def get_server_info(
        self, request: pb.GetServerInfoRequest, ctx: RequestContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        try:
            return self._servicer.server_info()
        except Exception:
            raise _internal(request, ctx) from None


_AT = re.compile(r' at "([^"]+)"')
_NO_FIELD = re.compile(r'has no field named "([^"]+)"')
_PARSING = re.compile(r"Failed to parse (\w+) field: ")


def _json_violation(exc: Exception) -> FieldViolation:
    """The field a protobuf JSON parse error is about (json_format names it in its message) and the rule."""
    text = str(exc)
    path = ".".join(_PARSING.findall(text))
    at = _AT.search(text)
    if not path and at and "." in at.group(1):
        path = at.group(1).split(".", 1)[1]
    missing = _NO_FIELD.search(text)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return FieldViolation(path, "is not a field of this message")
    rule = _AT.sub("", _PARSING.sub("", text)).strip().rstrip(".")
    if rule.startswith("invalid literal for int()"):
        rule = "must be an integer"
    return FieldViolation(path or "request", rule or "is not valid JSON for this message")


class _StrictJSON(_codec.ProtoJSONCodec):  # type: ignore[type-arg]
    """JSON decoding whose failures are INVALID_ARGUMENT naming the field (the library's own say UNKNOWN)."""

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return super().decode(data, message)
        except (json_format.ParseError, UnicodeDecodeError, ValueError, TypeError) as exc:
            raise invalid_error([_json_violation(exc)]) from None


class _StrictProto(_codec.ProtoBinaryCodec):  # type: ignore[type-arg]
    """Binary decoding whose failures name the field with invalid UTF-8, as the gRPC edge does."""

    def decode(self, data: bytes | bytearray, message: Any) -> Any:
        try:
            return super().decode(data, message)
        except DecodeError:
            kind = type(message) if isinstance(message, Message) else None
            raise invalid_error(Undecodable(bytes(data), kind).violations()) from None


def install_strict_codecs() -> None:
    """Replaces connect-python's request codecs with the strict ones above. connect-python 0.9 keeps its codecs in
    one module-level table with no registration call (its own TODO plans per-handler codecs); the swap keeps
    encoding byte-identical and only changes what a malformed request is answered with
    (tests/test_http_connect.py checks both)."""
    strict_json, strict_proto = _StrictJSON(), _StrictProto()
    for name, codec in list(_codec._codecs.items()):
        _codec._codecs[name] = strict_json if isinstance(codec, _codec.ProtoJSONCodec) else strict_proto


class BoundedGzip(GzipCompression):
    """gzip whose decompression stops at `limit` bytes: a small compressed body (a "zip bomb") could otherwise
    expand to gigabytes before connect-python compares the message with --max-message-bytes."""

    def __init__(self, limit: int):
        super().__init__()
        self._limit = limit

    def decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        out = bytearray()
        rest = bytes(data)
        while rest:
            inflater = zlib.decompressobj(wbits=31)  # one gzip member; a body may hold several
            try:
                out += inflater.decompress(rest, self._limit + 1 - len(out))
            except zlib.error:
                raise invalid_error([FieldViolation("request", "is not valid gzip data")]) from None
            if len(out) > self._limit or inflater.unconsumed_tail:
                raise ConnectError(
                    Code.RESOURCE_EXHAUSTED,
                    f"the request decompresses to more than {self._limit} bytes (the server's max_message_bytes)",
                )
            if not inflater.eof:
                raise invalid_error([FieldViolation("request", "is truncated gzip data")])
            rest = inflater.unused_data
        return bytes(out)
