"""The HTTP port's one ASGI application: Connect / gRPC-Web / JSON, the A1111-compatible REST subset, the OpenAPI
document, the playground page and plain health checks, behind the same API-key check as gRPC."""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdserve_core.auth import MISSING_KEY, KeyCheck

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WEB_DIR = Path(__file__).resolve().parent / "web"
# Paths anyone may fetch: the page and its assets, the API description and the health checks. Everything else
# (the RPCs, /sdapi) needs a key when the server has keys.
OPEN_PATHS = ("/", "/index.html", "/openapi.json", "/healthz", "/readyz")
OPEN_PREFIXES = ("/assets/",)


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A complete plain response."""
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, value: Any, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A complete JSON response."""
    await send_bytes(send, status, json.dumps(value).encode(), "application/json", headers)


def header(scope: Scope, name: bytes) -> str:
    """The first value of request header `name` (lower case), or ""."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


class StaticFiles:
    """The playground's files from one folder; `/` is index.html. Nothing outside the folder is reachable."""

    def __init__(self, root: Path):
        self._root = root.resolve()

    def _file(self, path: str) -> Path | None:
        rel = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        target = (self._root / rel).resolve()
        if not target.is_relative_to(self._root) or not target.is_file():
            return None
        return target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._file(scope["path"])
        if scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 405, {"detail": "only GET and HEAD are served here"}, [(b"allow", b"GET, HEAD")])
            return
        if target is None:
            await send_json(send, 404, {"detail": f"no such page: {scope['path']}"})
            return
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind in ("application/javascript", "text/javascript"):
            kind += "; charset=utf-8"
        body = target.read_bytes()
        await send_bytes(send, 200, b"" if scope["method"] == "HEAD" else body, kind, [(b"cache-control", b"no-cache")])


class HttpApp:
    """Routes by path prefix to the mounted applications; checks the API key first where one is needed.

    `routes` maps a path prefix to an ASGI app, longest prefix first; `exact` maps whole paths to apps;
    `ready()` says whether the default model is served (GET /readyz); `on_reject(path, transport)` counts a call
    refused for its key."""

    def __init__(
        self,
        routes: Mapping[str, ASGIApp],
        exact: Mapping[str, ASGIApp],
        keys: Sequence[str],
        ready: Callable[[], bool],
        on_reject: Callable[[str, str], None],
        static: ASGIApp | None = None,
    ):
        self._routes = sorted(routes.items(), key=lambda kv: -len(kv[0]))
        self._exact = dict(exact)
        self._check = KeyCheck(keys) if keys else None
        self._ready = ready
        self._on_reject = on_reject
        self._static = static or StaticFiles(WEB_DIR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or self._ready()
            await send_json(send, 200 if ok else 503, {"status": "SERVING" if ok else "NOT_SERVING"})
            return
        if self._check is not None and not _is_open(path) and not self._authorized(scope):
            await self._refuse(scope, send)
            return
        app = self._exact.get(path) or next((a for prefix, a in self._routes if path.startswith(prefix)), None)
        await (app or self._static)(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self._check is not None
        values = [bytes(v).decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        return self._check.valid(values)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        """UNAUTHENTICATED in the caller's protocol: gRPC-Web trailers-only, Connect's JSON error, or A1111's."""
        path = scope["path"]
        content_type = header(scope, b"content-type")
        if path.startswith("/sdapi/"):
            self._on_reject(path, "a1111")
            await send_json(send, 401, {"detail": MISSING_KEY.replace("metadata", "header")})
        elif content_type.startswith("application/grpc"):
            transport = "grpc-web" if content_type.startswith("application/grpc-web") else "grpc"
            self._on_reject(path, transport)
            message = MISSING_KEY.replace("'", "").replace(" ", "%20")
            head = [
                (b"content-type", content_type.encode()),
                (b"grpc-status", b"16"),
                (b"grpc-message", message.encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            self._on_reject(path, "connect")
            body = {"code": "unauthenticated", "message": MISSING_KEY.replace("metadata", "header")}
            await send_json(send, 401, body)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up: the server owns every resource; answer the ASGI lifespan protocol."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
