"""Builds and runs the sidecar's grpc.aio server on TCP and/or a Unix socket, with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from model_manager.hub import Hub
from model_manager.layout import StoreLayout
from model_manager.ops import Operations
from model_manager.servicer import ModelManagerServicer
from model_manager.settings import Settings
from model_manager.store import Store
from sdserve.v1 import model_manager_pb2 as pb
from sdserve.v1 import model_manager_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelManagerService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ManagerServer:
    """One sidecar process: start(), port, stop()."""

    def __init__(self, settings: Settings):
        self.settings = settings
        layout = StoreLayout(settings.store)
        self.store = Store(
            layout,
            budget_bytes=settings.max_store_bytes,
            min_free_bytes=settings.min_free_bytes,
            verify_mode=settings.verify_on_start,
            partial_max_age_s=settings.partial_max_age_hours * 3600,
        )
        hub = Hub(settings.hf_endpoint, settings.hf_token, settings.hub_timeout, settings.offline, layout.downloads)
        self.ops = Operations(settings, self.store, hub)
        self.servicer = ModelManagerServicer(self.store, self.ops, settings)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = 0

    async def start(self) -> int:
        """Reconciles the store, binds, and reports SERVING; returns the TCP port (0 without TCP)."""
        s = self.settings
        await asyncio.to_thread(self.store.open)
        if s.port >= 0:
            self.port = self.grpc.add_insecure_port(f"{s.host}:{s.port}")
            if self.port == 0:
                raise SystemExit(f"could not bind {s.host}:{s.port}")
        if s.unix_socket:
            sock = Path(s.unix_socket)
            await asyncio.to_thread(_clear_socket, sock)
            if not self.grpc.add_insecure_port(f"unix:{sock}"):
                raise SystemExit(f"could not bind unix:{sock}")
        await self.grpc.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if s.port_file:
            await asyncio.to_thread(Path(s.port_file).write_text, str(self.port))
        log.info(
            "serving",
            extra={"port": self.port, "unix_socket": s.unix_socket, "store": str(self.store.layout.root)},
        )
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        self.store.close()


def _clear_socket(sock: Path) -> None:
    """Creates the socket's folder and removes a stale socket left by a killed sidecar."""
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.is_socket():
        sock.unlink()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT. Running operations are cancelled; their staging folders are removed."""
    server = ManagerServer(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("stopping")
    await server.stop(5.0)
    log.info("stopped")
