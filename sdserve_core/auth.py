"""API-key authentication: bearer tokens compared in constant time; health and reflection stay open."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

MISSING_KEY = "missing or invalid API key: send 'authorization: Bearer <key>' metadata"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")


def load_keys(inline: Iterable[str], path: str) -> tuple[str, ...]:
    """Keys from the settings plus one per line of `path` (blank lines and # comments ignored)."""
    keys = [k for k in inline if k]
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return tuple(keys)


def bearer_token(value: str) -> str:
    """The token of an `authorization` value using the Bearer scheme, else "".

    The scheme is case-insensitive (RFC 7235 section 2.1) and the whitespace around the token is not part of it.
    """
    parts = value.split(None, 1)
    return parts[1].strip() if len(parts) == 2 and parts[0].lower() == "bearer" else ""


class KeyCheck:
    """Accepts a bearer token that is one of the keys; every transport (gRPC, HTTP) checks with one of these."""

    def __init__(self, keys: Iterable[str]):
        # Compare digests so every comparison takes the same time whatever the key lengths.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def valid(self, authorization: Iterable[str]) -> bool:
        """Whether one of the `authorization` header values is `Bearer <a key>`."""
        token = ""
        for value in authorization:
            token = bearer_token(value) or token
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for expected in self._digests:
            ok |= hmac.compare_digest(digest, expected)
        return ok and bool(token)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without a valid `authorization: Bearer <key>` with UNAUTHENTICATED."""

    def __init__(self, keys: Iterable[str], on_reject: Callable[[str], None] | None = None):
        self._check = KeyCheck(keys)
        self._on_reject = on_reject

    def _valid(self, metadata: Any) -> bool:
        return self._check.valid(
            value for key, value in metadata or () if key == "authorization" and isinstance(value, str)
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_SERVICES) or self._valid(handler_call_details.invocation_metadata):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        message = MISSING_KEY

        if handler.response_streaming:

            async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - makes this an async generator

            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer
            )

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
