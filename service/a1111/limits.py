"""A request-body size limit for the REST routes: a body over the limit is answered 413 before anything parses it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from service.http_app import Receive, Scope, Send, send_json


class BodyLimit:
    """Reads the whole request body (at most `limit` bytes, the server's max_message_bytes) before calling `app`,
    then hands it the body and, after it, the connection's own messages (so the app still hears a disconnect)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int):
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self._limit:
                detail = f"the request body is over {self._limit} bytes, the server's max_message_bytes"
                await send_json(send, 413, {"detail": detail})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)
