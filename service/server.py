"""Builds and runs the grpc.aio server: services, health, reflection, limits and graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service import device
from service.engine import Engine
from service.models import ModelRegistry
from service.servicer import DiffusionServicer
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
# Liveness does not depend on models: it answers SERVING as long as the process serves RPCs.
LIVENESS_NAME = "liveness"


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message limits set explicitly (images exceed gRPC's 4 MiB default)."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]


class Server:
    """One sdserve server process: start(), port, wait(), stop()."""

    def __init__(self, settings: Settings):
        self.settings = settings
        choice = device.choose(settings.device, settings.dtype)
        self.registry = ModelRegistry(settings.model_dirs, choice, settings.aliases)
        self.engine = Engine(settings, choice, self.registry)
        self.servicer = DiffusionServicer(self.engine, settings)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.grpc = grpc.aio.server(options=grpc_options(settings))
        pb_grpc.add_DiffusionServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = 0
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Binds, reports NOT_SERVING, loads and warms the default model, then reports SERVING."""
        s = self.settings
        self.port = self.grpc.add_insecure_port(f"{s.host}:{s.port}")
        if self.port == 0:
            raise SystemExit(f"could not bind {s.host}:{s.port}")
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.grpc.start()
        if s.port_file:
            await asyncio.to_thread(Path(s.port_file).write_text, str(self.port))
        log.info("listening", extra={"host": s.host, "port": self.port})
        await asyncio.to_thread(self.engine.start)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"default_model": self.registry.default_model, "device": self.engine.choice.type})
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stops taking requests, lets streams finish within `grace` seconds, then stops the worker."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        await asyncio.to_thread(self.engine.stop, 5.0)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("draining")
    await server.stop(30.0)
    log.info("stopped")
