"""The outermost server interceptor: undecodable requests become INVALID_ARGUMENT naming the field, and any
exception a handler lets escape becomes a generic INTERNAL (the traceback goes to the log with the request id),
so no call ever ends UNKNOWN or with a class name in its message. Used by the server and the sidecar."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import DecodeError, Message

from sdserve_core.status import FieldViolation, invalid_message, pack

log = logging.getLogger(__name__)

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


class Undecodable:
    """What the deserializer returns instead of raising: the bytes that failed and the message type expected."""

    def __init__(self, data: bytes, message: type[Message] | None):
        self.data = data
        self.message = message

    def violations(self) -> list[FieldViolation]:
        """Every string field holding invalid UTF-8, by path; else one violation for the whole message."""
        if self.message is not None:
            try:
                found = invalid_utf8_fields(self.data, self.message.DESCRIPTOR)
            except ValueError:
                found = []
            if found:
                return [FieldViolation(path, "must be valid UTF-8 text") for path in found]
        name = self.message.DESCRIPTOR.full_name if self.message is not None else "request"
        return [FieldViolation("request", f"is not a well-formed {name} message (protobuf wire format)")]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def invalid_utf8_fields(data: bytes, desc: Any, prefix: str = "") -> list[str]:
    """Paths (`params.prompt`) of string fields in serialized `data` whose bytes are not UTF-8; raises ValueError
    when the wire format itself is broken."""
    out: list[str] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire, field = key & 7, desc.fields_by_number.get(key >> 3)
        if wire == _WIRE_VARINT:
            _, pos = _varint(data, pos)
        elif wire in (_WIRE_FIXED64, _WIRE_FIXED32):
            pos += 8 if wire == _WIRE_FIXED64 else 4
        elif wire == _WIRE_BYTES:
            size, pos = _varint(data, pos)
            chunk, pos = data[pos : pos + size], pos + size
            if field is None:
                continue
            path = prefix + field.name
            if field.type == _descriptor.FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    out.append(path)
            elif field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                out += invalid_utf8_fields(chunk, field.message_type, path + ".")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
    return out


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message = getattr(deserializer, "__self__", None)
    message_type = message if isinstance(message, type) and issubclass(message, Message) else None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable(data, message_type)

    return parse


def _request_id(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    params = getattr(request, "params", None)
    rid = getattr(params, "request_id", "") or getattr(request, "request_id", "")
    if isinstance(rid, str) and rid and len(rid) <= 128 and rid.isprintable():
        return rid
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value.isprintable() and len(value) <= 128:
            return value
    return uuid.uuid4().hex


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    violations = request.violations()
    message = invalid_message(violations)
    log.info("request", extra={"rpc": method.rsplit("/", 1)[-1], "outcome": "invalid", "error": message})
    code, message, metadata = pack(grpc.StatusCode.INVALID_ARGUMENT, message, violations)
    await context.abort(code, message, trailing_metadata=metadata)


async def _internal(request: Any, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    rid = _request_id(request, context)
    log.exception("unhandled error", extra={"rpc": method.rsplit("/", 1)[-1], "request_id": rid})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); the server log has the details")


def _passes(exc: BaseException) -> bool:
    """Exceptions that are how a call ends normally: aborts and cancellation."""
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit))


def _wrap_unary(behavior: Any, method: str) -> Any:
    """Wraps a handler that returns its reply, or (response streaming in the write() style, like the health
    service's Watch) a coroutine that writes its replies through the context and returns nothing."""

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(request, context, method)

    return call


def _wrap_stream(behavior: Any, method: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context, method)
            return
        inner = behavior(request, context)
        try:
            async for item in inner:
                yield item
        except Exception as exc:
            if _passes(exc):
                raise
            await _internal(request, context, method)
        finally:
            # Close the handler's generator now so its own cleanup (cancel the job, account) runs at once.
            await inner.aclose()

    return call


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every unary-request handler: lenient decoding and a catch-all. Install it first."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        parse = _lenient(handler.request_deserializer)
        if handler.response_streaming:
            # An async generator yields its replies; a coroutine writes them through context.write().
            wrap = _wrap_stream if inspect.isasyncgenfunction(handler.unary_stream) else _wrap_unary
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream, method), parse, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, method), parse, handler.response_serializer
        )
