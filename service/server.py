"""Builds and runs the grpc.aio server: services, health, reflection, auth, TLS, metrics and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from sdserve_core import lazy_imports, tracing
from sdserve_core.auth import ApiKeyInterceptor, load_keys
from sdserve_core.edge import EdgeInterceptor
from sdserve_core.startup import bind, serve_metrics
from sdserve_core.tls import server_credentials
from service import device, metrics, schedulers
from service.accounting import Accounting
from service.adapters import AdapterCatalog, AdapterPool
from service.admission import Admission
from service.batch_call import BatchStats
from service.batching import BatchPolicy
from service.execution import ProfileBook
from service.job_queue import JobQueue
from service.jobs import Job
from service.lifecycle import ModelLifecycle
from service.models import ModelRegistry, ModelState
from service.observers import Observer, Observers
from service.prompt_cache import PromptCache
from service.requests import Failed, Outcome
from service.servicer import DiffusionServicer
from service.settings import Settings, memory_policy
from service.threads import run_in_fresh_thread
from service.tracing import Tracing
from service.worker import DeviceWorker

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
# Liveness does not depend on models: it answers SERVING as long as the process serves RPCs.
LIVENESS_NAME = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: explicit message limits (images exceed 4 MiB), keepalive and connection age."""
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 10 s without being told off (GOAWAY too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # Without this a second server on a busy port shares it silently and gets half the connections.
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


class _IdleSignal(Observer):
    """Sets an asyncio event (from any thread) whenever the last active request finishes."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def idle(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.event.set)


class Server:
    """One sdserve server process: start(), port, drain(), stop(). `observers` hear of the server's work as well
    as its own metrics (tests pass one to wait for outcomes and swaps)."""

    def __init__(
        self, settings: Settings, observers: Sequence[Observer] = (), tracer_provider: TracerProvider | None = None
    ):
        self.settings = settings
        # OpenTelemetry's provider (sdserve_core.tracing.provider_from_environ; tests pass their own); None: off.
        self.tracing = Tracing(tracer_provider)
        self.choice = device.choose(settings.device, settings.dtype)
        self.metrics = metrics.ServerMetrics()
        self._idle = _IdleSignal()
        self.usage: Any = None
        if settings.manager_target:
            from service.watcher import UsageLog

            self.usage = UsageLog()
        self.accounting = Accounting(self.metrics)
        usage = [self.usage] if self.usage is not None else []
        told = Observers([self.accounting, self._idle, *usage, *observers])
        self.registry = ModelRegistry(
            settings.model_dirs, self.choice, settings.aliases, told, memory=memory_policy(settings)
        )
        self._told = told
        self._build_core(told)
        self.servicer = DiffusionServicer(
            self.admission,
            self.registry,
            self.batching,
            self.choice,
            settings,
            self.accounting,
            self.adapter_pool,
            self.profiles,
            self.tracing,
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.grpc = self._build_grpc()
        self.port = 0
        self.http_port = 0
        self._http: Any = None
        self._serving = False
        self.metrics_port = 0
        self._metrics_http: Any = None
        # The model-manager follower (service.watcher.StoreWatcher) when --manager-target is set.
        self.watcher: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self.metrics.add_collector(
            metrics.StateCollector(
                self.admission.queue_depths, self.admission.in_flight, self._loaded, self.choice.device
            )
        )

    def _build_core(self, told: Observer) -> None:
        """The queue, the device worker, the model lifecycle and admission, wired through `told`."""
        s = self.settings
        self.queue = JobQueue(s.max_queue)
        self.batching = BatchPolicy(s.max_batch_images)
        limit: Callable[[Job], int] = (
            self.batching.limit if s.batch_policy == "measured" else lambda job: s.max_batch_images
        )
        self.prompt_cache = PromptCache(s.prompt_cache_bytes, told) if s.prompt_cache_bytes > 0 else None
        learner = _BatchLearner(self.batching)
        self.adapters = AdapterCatalog(s.adapter_dirs)
        self.adapter_pool = AdapterPool(s.adapter_pool_bytes, told)
        self.profiles = ProfileBook(s, self.choice.type)
        self.worker = DeviceWorker(
            self.queue,
            self.registry,
            self.choice.type,
            limit,
            s.batch_wait_ms / 1000.0,
            self.prompt_cache,
            Observers([learner, told]),
            memory_policy(s),
            self.adapter_pool,
            self.profiles,
        )
        self.lifecycle = ModelLifecycle(
            s,
            self.choice,
            self.registry,
            self.worker,
            self.batching,
            self.prompt_cache,
            told,
            in_use=lambda: self.admission.slots_in_use(),  # noqa: PLW0108 (admission is built next)
            profiles=self.profiles,
        )
        self.admission = Admission(
            s, self.choice, self.registry, self.queue, Observers([self.lifecycle, told]), self.adapters
        )

    def _build_grpc(self) -> grpc.aio.Server:
        """The gRPC server with its services, health, reflection and interceptors (the edge first, so it also
        wraps what the API-key check answers)."""
        interceptors: list[Any] = [*self.tracing.interceptors(), EdgeInterceptor()]
        keys = load_keys(self.settings.api_keys, self.settings.api_keys_file)
        if keys:
            interceptors.append(ApiKeyInterceptor(keys, self.accounting.unauthenticated))
        server = grpc.aio.server(options=grpc_options(self.settings), interceptors=interceptors)
        pb_grpc.add_DiffusionServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _loaded(self) -> list[tuple[str, str, str, str, bool]]:
        dtype = self.choice.dtype_name
        out = []
        for entry in self.registry.entries():
            state, _ = self.registry.state(entry.slot)
            out.append((entry.name, entry.revision, entry.variant, dtype, state is ModelState.LOADED))
        return out

    async def _set_ready(self, status: Any) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def start(self) -> int:
        """Binds, reports NOT_SERVING, starts the device worker, follows the model manager if one is set, loads
        and warms the default model, then reports SERVING."""
        s = self.settings
        creds = server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        self.port = bind(self.grpc, f"{s.host}:{s.port}", creds, "--port")
        # Metrics first: a busy metrics port then stops start-up with one line, before gRPC serves anything.
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(self.metrics.registry, s.metrics_host, s.metrics_port)
        await self._set_ready(NOT_SERVING)
        await self.health.set(LIVENESS_NAME, SERVING)
        await self.grpc.start()
        await self._start_http()
        if s.port_file:
            await asyncio.to_thread(Path(s.port_file).write_text, str(self.port))
        log.info(
            "listening",
            extra={
                "host": s.host,
                "port": self.port,
                "http_port": self.http_port,
                "tls": bool(creds),
                "metrics_port": self.metrics_port,
            },
        )
        self._idle.bind(asyncio.get_running_loop())
        # Before a second thread can touch diffusers or transformers (sdserve_core/lazy_imports.py).
        lazy_imports.resolve(cls for cls, _ in schedulers.SCHEDULERS.values())
        self.worker.start()
        if s.manager_target:
            await self._follow_manager()
            await self._wait_for_default()
        await run_in_fresh_thread(self.lifecycle.start, "sdserve-startup")
        await self._set_ready(SERVING)
        self._serving = True
        log.info("serving", extra={"default_model": self.registry.default, "device": self.choice.type})
        return self.port

    async def _start_http(self) -> None:
        """The HTTP port (Connect / gRPC-Web / JSON, /sdapi, the page) when --http-port is set."""
        s = self.settings
        if s.http_port < 0:
            return
        from service.http_edge import build_app
        from service.http_server import HttpServer
        from service.manager_proxy import ManagerProxy

        self._manager_proxy = ManagerProxy(s)
        app = build_app(self.servicer, s, self.accounting, lambda: self._serving, self._manager_proxy)
        self._http = HttpServer(app, s.host, s.http_port, s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        self.http_port = await self._http.start()
        if s.http_port_file:
            await asyncio.to_thread(Path(s.http_port_file).write_text, str(self.http_port))

    async def _follow_manager(self) -> None:
        """Starts following the model manager and waits (up to --manager-wait-seconds) for its first snapshot."""
        from service.watcher import StoreWatcher

        s = self.settings
        self.watcher = StoreWatcher(
            s.manager_target, self.lifecycle, s, self.usage, observer=self._told, adapters=self.adapters
        )
        self._watch_task = asyncio.create_task(self.watcher.run())
        try:
            await asyncio.wait_for(self.watcher.synced.wait(), s.manager_wait_seconds)
        except TimeoutError:
            log.warning(
                "no snapshot from the model manager yet; serving local models", extra={"target": s.manager_target}
            )

    async def _wait_for_default(self) -> None:
        """Waits (up to --wait-for-default-seconds, NOT_SERVING meanwhile) until the sidecar publishes the default
        model: --default-model, else its `default` alias (a declared state's, reconciled after a download)."""
        s = self.settings
        name = s.default_model or "default"
        deadline = time.monotonic() + s.wait_for_default_seconds
        if s.wait_for_default_seconds and self.registry.slot_of(name) is None:
            log.info("waiting for the sidecar to publish the default model", extra={"model": name})
        while s.wait_for_default_seconds and self.registry.slot_of(name) is None:
            if time.monotonic() >= deadline:
                log.warning("the default model was not published in time; going on", extra={"model": name})
                return
            # The watcher applies snapshots on this loop; a short poll keeps this independent of its internals.
            await asyncio.sleep(0.2)

    async def drain(self, grace: float, force: asyncio.Event | None = None) -> int:
        """Stops admitting work (NOT_SERVING, new calls UNAVAILABLE) and waits up to `grace` seconds for
        in-flight streams; what is left (or everything, once `force` is set) ends UNAVAILABLE.
        Returns how many requests were cut off."""
        self.admission.begin_drain()
        self._serving = False
        await self._set_ready(NOT_SERVING)
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wait_idle())]
        if force is not None:
            waiters.append(asyncio.ensure_future(force.wait()))
        _, pending = await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        left = self.admission.abort_all(
            Failed(Outcome.UNAVAILABLE, "the server shut down before this request finished; retry elsewhere")
        )
        if left:
            log.warning("drain cut off requests", extra={"requests": left})
        return left

    async def _wait_idle(self) -> None:
        while self.admission.active_count():
            self._idle.event.clear()
            if not self.admission.active_count():
                break
            await self._idle.event.wait()

    async def stop(self, grace: float = 5.0, force: asyncio.Event | None = None) -> None:
        """Drains, then stops the gRPC server, the worker and the metrics endpoint."""
        await self.drain(grace, force)
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.health.enter_graceful_shutdown()
        # Streams already ended; the short grace lets their final status frames flush.
        await self.grpc.stop(1.0)
        if self._http is not None:
            await self._http.stop()
            await self._manager_proxy.close()
        self.admission.stop()
        await asyncio.to_thread(self.worker.join, 10.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


class _BatchLearner(Observer):
    """Feeds each live batch's measured step time to the batch policy."""

    def __init__(self, policy: BatchPolicy):
        self._policy = policy

    def batch_ran(self, jobs: list[Job], stats: BatchStats) -> None:
        if stats.steps >= 2:
            self._policy.observe(BatchPolicy.key_of(jobs[0]), stats.images, stats.step_seconds)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains: a second signal cuts the drain short."""
    provider = tracing.provider_from_environ("sdserve")
    server = Server(settings, tracer_provider=provider)
    loop = asyncio.get_running_loop()
    first = asyncio.Event()
    second = asyncio.Event()

    def on_signal() -> None:
        (second if first.is_set() else first).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.start()
    await first.wait()
    log.info("draining", extra={"grace_seconds": settings.grace_seconds, "active": server.admission.active_count()})
    await server.stop(settings.grace_seconds, second)
    await asyncio.to_thread(tracing.shutdown, provider)
    log.info("stopped")
