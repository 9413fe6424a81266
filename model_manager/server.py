"""Builds and runs the sidecar's grpc.aio server on TCP (optionally TLS) and/or a Unix socket, with health,
reflection, API keys and a Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from model_manager import metrics
from model_manager.adapters import AdapterStore
from model_manager.hub import Hub
from model_manager.layout import StoreLayout
from model_manager.ops import Operations
from model_manager.reconcile import reconciler_for
from model_manager.servicer import ModelManagerServicer
from model_manager.settings import Settings
from model_manager.store import Store
from sdserve.v1 import model_manager_pb2 as pb
from sdserve.v1 import model_manager_pb2_grpc as pb_grpc
from sdserve_core import tracing
from sdserve_core.auth import ApiKeyInterceptor, load_keys
from sdserve_core.edge import EdgeInterceptor
from sdserve_core.startup import bind, serve_metrics
from sdserve_core.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelManagerService"].full_name
# SERVING while the process answers RPCs; "" and SERVICE_NAME also wait for a declared `default` alias to be ready.
LIVENESS_NAME = "liveness"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ManagerServer:
    """One sidecar process: start(), port, stop()."""

    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None):
        self.settings = settings
        # OpenTelemetry's provider (sdserve_core.tracing.provider_from_environ; tests pass their own); None: off.
        tracer = None if tracer_provider is None else tracer_provider.get_tracer("sdserve.model_manager")
        layout = StoreLayout(settings.store, Path(settings.state_dir) if settings.state_dir else None)
        self.store = Store(
            layout,
            read_only=settings.read_only_store,
            budget_bytes=settings.max_store_bytes,
            min_free_bytes=settings.min_free_bytes,
            verify_mode=settings.verify_on_start,
            partial_max_age_s=settings.partial_max_age_hours * 3600,
        )
        hub = Hub(settings.hf_endpoint, settings.hf_token, settings.hub_timeout, settings.offline, layout.downloads)
        self.metrics = metrics.ManagerMetrics()
        self.store.subscribe(self.metrics.on_store_change)
        self.ops = Operations(settings, self.store, hub, self.metrics, tracer)
        self.adapters = AdapterStore(self.ops)
        self.ops.scrubber.also.append(self.adapters.scrub)
        self.metrics.add_collector(metrics.StoreCollector(self.store, self.metrics, self.adapters.usage))
        self.servicer = ModelManagerServicer(self.store, self.ops, settings, self.adapters)
        self.declared = reconciler_for(settings, self.ops, self.adapters)
        self.servicer.declared = self.declared
        self._declared_task: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # The edge goes first so it also wraps what the API-key check answers.
        interceptors: list[Any] = [*tracing.server_interceptors(tracer_provider), EdgeInterceptor()]
        try:
            keys = load_keys(settings.api_keys, settings.api_keys_file)
        except OSError as exc:
            raise SystemExit(f"cannot read --api-keys-file: {exc}") from None
        if keys:
            interceptors.append(ApiKeyInterceptor(keys, self._refused))
        self.authenticated = bool(keys)
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=interceptors,
        )
        pb_grpc.add_ModelManagerServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None

    def _refused(self, method: str) -> None:
        log.warning("call refused: missing or invalid API key", extra={"rpc": method})
        self.metrics.on_unauthenticated(method)

    async def start(self) -> int:
        """Reconciles the store, binds, and reports SERVING; returns the TCP port (0 without TCP)."""
        s = self.settings
        creds = server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        await asyncio.to_thread(self.store.open)
        self.ops.scrubber.start()
        if s.port >= 0:
            address = f"{s.host}:{s.port}"
            self.port = bind(self.grpc, address, creds, "--port")
        if s.unix_socket:
            sock = Path(s.unix_socket)
            await asyncio.to_thread(_clear_socket, sock)
            if not self.grpc.add_insecure_port(f"unix:{sock}"):
                raise SystemExit(f"could not bind unix:{sock}")
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(self.metrics.registry, s.metrics_host, s.metrics_port)
        await self.health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._report_ready(self.declared is None)
        await self.grpc.start()
        if self.declared is not None:
            self._declared_task = asyncio.create_task(self.declared.run(self._report_ready))
        if s.port_file:
            await asyncio.to_thread(Path(s.port_file).write_text, str(self.port))
        if not self.authenticated and s.port >= 0 and not _loopback(s.host):
            log.warning(
                "the store API accepts every caller on a non-loopback interface: set --api-keys or --api-keys-file",
                extra={"host": s.host},
            )
        log.info(
            "serving",
            extra={
                "port": self.port,
                "unix_socket": s.unix_socket,
                "store": str(self.store.layout.root),
                "tls": creds is not None,
                "mtls": bool(s.tls_client_ca_file),
                "api_keys": self.authenticated,
                "metrics_port": self.metrics_port,
            },
        )
        return self.port

    async def _report_ready(self, ready: bool) -> None:
        """Sets "" and the service's health (only when it changes, so Watch streams hear each change once)."""
        if ready == self._ready:
            return
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        if self.declared is not None:
            log.info("ready" if ready else "not ready", extra={"declared_state": self.settings.declared_state})

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.declared is not None and self._declared_task is not None:
            self.declared.close()
            # A running operation stops at its next progress check; give it a bounded time to clean up.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._declared_task, 60)
        await self.grpc.stop(grace)
        if self._metrics_http is not None:
            metrics.stop_http(self._metrics_http)
            self._metrics_http = None
        self.store.unsubscribe(self.metrics.on_store_change)
        self.ops.scrubber.stop()
        self.store.close()


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _clear_socket(sock: Path) -> None:
    """Creates the socket's folder and removes a stale socket left by a killed sidecar."""
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.is_socket():
        sock.unlink()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT. Running operations are cancelled; their staging folders are removed."""
    provider = tracing.provider_from_environ("sdserve-manager")
    server = ManagerServer(settings, provider)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await stopping.wait()
    log.info("stopping")
    await server.stop(5.0)
    await asyncio.to_thread(tracing.shutdown, provider)
    log.info("stopped")
