"""Serves the HTTP application with hypercorn (HTTP/1.1 and HTTP/2, TLS with ALPN or h2c) in the server's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from hypercorn.asyncio import serve
from hypercorn.config import Config

from service.http_app import ASGIApp

log = logging.getLogger(__name__)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket bound now, so a busy port stops start-up at once and port 0 is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"--http-port {port}: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _config(sock: socket.socket, cert_file: str, key_file: str, client_ca_file: str) -> Config:
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("service.http")
    # Streams already ended when this is reached (the server drains first); let their last frames flush.
    config.graceful_timeout = 1.0
    # Generations stream for minutes; keep idle keep-alive connections for a while but never cut a response.
    config.keep_alive_timeout = 75.0
    if cert_file:
        config.certfile = cert_file
        config.keyfile = key_file
        if client_ca_file:
            config.ca_certs = client_ca_file
            config.verify_mode = ssl.CERT_REQUIRED
    return config


class HttpServer:
    """start() binds and serves `app`; stop() closes the listener and lets open responses finish briefly."""

    def __init__(self, app: ASGIApp, host: str, port: int, cert_file: str = "", key_file: str = "", ca: str = ""):
        self._app = app
        self._host = host
        self._port = port
        self._tls = (cert_file, key_file, ca)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    async def start(self) -> int:
        self._sock = _listen(self._host, self._port)
        self.port = self._sock.getsockname()[1]
        config = _config(self._sock, *self._tls)
        self._task = asyncio.create_task(
            serve(self._app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
        )
        return self.port

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5.0)
            except TimeoutError:
                log.warning("the HTTP server did not stop in 5 s; cancelling it")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._sock is not None:
            # hypercorn wraps the descriptor itself (socket.fromfd) and may have closed it already.
            with contextlib.suppress(OSError):
                self._sock.close()
