"""Process start-up shared by the server and the sidecar: listening ports, the /metrics endpoint and the
`python -m` entry, each refusing with one line that names the flag instead of a traceback."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)


def bind(server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None, flag: str) -> int:
    """Adds a listening port; a port another process holds stops start-up with one line naming the flag
    (set grpc.so_reuseport to 0, so a busy port fails instead of being silently shared)."""
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise SystemExit(f"{flag}: cannot listen on {address} (in use, or not an address of this machine)")
    return port


def serve_metrics(registry: Any, host: str, port: int) -> tuple[Any, int]:
    """Serves /metrics for `registry` on host:port in a background thread; returns (server, bound port)."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise SystemExit(f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror}") from None
    return server, int(server.server_port)


def run_main(prog: str, main: Coroutine[Any, Any, None]) -> None:
    """Runs a server's main coroutine; a start-up refusal or an unreadable file ends the process with one line
    (`--log-level DEBUG` still logs the traceback). A crash in native code (SIGSEGV, SIGABRT...) writes every
    thread's Python stack to stderr before the process dies, so a log shows where it happened."""
    faulthandler.enable()
    try:
        asyncio.run(main)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        _die(prog, exc.code)
    except OSError as exc:
        log.debug("start-up failed", exc_info=True)
        what = exc.strerror or str(exc)
        _die(prog, f"{exc.filename}: {what}" if exc.filename else what)


def _die(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    # Skip finalizers: a half-started gRPC server's would complain that its event loop is closed.
    os._exit(1)
