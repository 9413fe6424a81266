"""Builds and runs the grpc.aio server: services, health, reflection, auth, TLS, metrics and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from sdserve_core.auth import ApiKeyInterceptor, load_keys
from sdserve_core.edge import EdgeInterceptor
from sdserve_core.startup import bind, serve_metrics
from sdserve_core.tls import server_credentials
from service import device, metrics
from service.engine import Engine
from service.jobs import Job
from service.models import ModelEntry, ModelRegistry
from service.requests import Event, Failed, Outcome, Result
from service.runner import BatchStats
from service.servicer import DiffusionServicer
from service.settings import Settings
from service.threads import run_in_fresh_thread

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


class Server:
    """One sdserve server process: start(), port, drain(), stop()."""

    def __init__(self, settings: Settings):
        self.settings = settings
        choice = device.choose(settings.device, settings.dtype)
        self.registry = ModelRegistry(settings.model_dirs, choice, settings.aliases)
        self.engine = Engine(settings, choice, self.registry)
        self.metrics = metrics.ServerMetrics()
        self.servicer = DiffusionServicer(self.engine, settings, self.metrics)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # The edge goes first so it also wraps what the API-key check answers.
        interceptors: list[Any] = [EdgeInterceptor()]
        keys = load_keys(settings.api_keys, settings.api_keys_file)
        if keys:
            interceptors.append(ApiKeyInterceptor(keys, self._count_unauthenticated))
        self.grpc = grpc.aio.server(options=grpc_options(settings), interceptors=interceptors)
        pb_grpc.add_DiffusionServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None
        self._idle = asyncio.Event()
        # The model-manager follower (service.watcher.StoreWatcher) when --manager-target is set.
        self.watcher: Any = None
        self._watch_task: asyncio.Task[None] | None = None
        self._wire_metrics()

    def _count_unauthenticated(self, method: str) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.metrics.requests.labels(rpc, "unknown", "", "", "unauthenticated").inc()

    def _wire_metrics(self) -> None:
        m = self.metrics

        def loaded() -> list[tuple[str, str, str, str, bool]]:
            dtype = self.engine.choice.dtype_name
            out = []
            for entry in self.registry.entries():
                state, _ = self.registry.state(entry.slot)
                out.append((entry.name, entry.revision, entry.variant, dtype, state.value == "loaded"))
            return out

        m.add_collector(
            metrics.StateCollector(self.queue_depths, self.engine.in_flight, loaded, self.engine.choice.device)
        )

        def on_finish(job: Job, event: Event) -> None:
            r = job.resolved
            labels = (r.model, r.task.value)
            if job.started_at is not None:
                m.queue_seconds.labels(*labels).observe(job.started_at - job.enqueued_at)
            if isinstance(event, Result):
                m.inference_seconds.labels(*labels).observe(time.monotonic() - (job.started_at or job.enqueued_at))
                m.images.labels(*labels).inc(len(event.images))
            if job.first_progress_at is not None:
                m.first_progress_seconds.labels(*labels).observe(job.first_progress_at - job.arrived_at)

        def on_batch(jobs: list[Job], stats: BatchStats) -> None:
            model = jobs[0].resolved.model
            m.batch_requests.labels(model).observe(len(jobs))
            m.batch_images.labels(model).observe(stats.images)
            if stats.steps:
                m.step_seconds.labels(model).observe(stats.step_seconds)

        def on_load(entry: ModelEntry, seconds: float) -> None:
            m.model_load_seconds.labels(entry.name).observe(seconds)

        self.engine.finish_hooks.append(on_finish)
        self.engine.worker.batch_hooks.append(on_batch)
        self.engine.swap_hooks.append(lambda ok: m.swaps.labels("ok" if ok else "failed").inc())
        self.registry.load_hooks.append(on_load)
        if self.engine.prompt_cache is not None:
            self.engine.prompt_cache.on_lookup = lambda hit: m.prompt_cache.labels("hit" if hit else "miss").inc()

    def queue_depths(self) -> dict[str, int]:
        depths = dict.fromkeys((e.name for e in self.registry.entries()), 0)
        depths.update(self.engine.queue.depth_by_model())
        return depths

    async def _set_ready(self, status: Any) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def start(self) -> int:
        """Binds, reports NOT_SERVING, loads and warms the default model, then reports SERVING."""
        s = self.settings
        address = f"{s.host}:{s.port}"
        creds = server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
        self.port = bind(self.grpc, address, creds, "--port")
        # Metrics first: a busy metrics port then stops start-up with one line, before gRPC serves anything.
        if s.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(self.metrics.registry, s.metrics_host, s.metrics_port)
        await self._set_ready(NOT_SERVING)
        await self.health.set(LIVENESS_NAME, SERVING)
        await self.grpc.start()
        if s.port_file:
            await asyncio.to_thread(Path(s.port_file).write_text, str(self.port))
        log.info(
            "listening",
            extra={"host": s.host, "port": self.port, "tls": bool(creds), "metrics_port": self.metrics_port},
        )
        loop = asyncio.get_running_loop()

        def idle() -> None:
            loop.call_soon_threadsafe(self._idle.set)

        self.engine.on_idle = idle
        if s.manager_target:
            from service.watcher import StoreWatcher

            self.watcher = StoreWatcher(s.manager_target, self.engine, s.max_message_bytes, settings=s)
            self._watch_task = asyncio.create_task(self.watcher.run())
            try:
                await asyncio.wait_for(self.watcher.synced.wait(), s.manager_wait_seconds)
            except TimeoutError:
                log.warning(
                    "no snapshot from the model manager yet; serving local models", extra={"target": s.manager_target}
                )
        await run_in_fresh_thread(self.engine.start, "sdserve-startup")
        await self._set_ready(SERVING)
        log.info("serving", extra={"default_model": self.registry.default_model, "device": self.engine.choice.type})
        return self.port

    async def drain(self, grace: float, force: asyncio.Event | None = None) -> int:
        """Stops admitting work (NOT_SERVING, new calls UNAVAILABLE) and waits up to `grace` seconds for
        in-flight streams; what is left (or everything, once `force` is set) ends UNAVAILABLE.
        Returns how many requests were cut off."""
        self.servicer.draining = True
        await self._set_ready(NOT_SERVING)
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wait_idle())]
        if force is not None:
            waiters.append(asyncio.ensure_future(force.wait()))
        _, pending = await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()
        left = self.engine.abort_all(
            Failed(Outcome.UNAVAILABLE, "the server shut down before this request finished; retry elsewhere")
        )
        if left:
            log.warning("drain cut off requests", extra={"requests": left})
        return left

    async def _wait_idle(self) -> None:
        while self.engine.active_count():
            self._idle.clear()
            if not self.engine.active_count():
                break
            await self._idle.wait()

    async def stop(self, grace: float = 5.0, force: asyncio.Event | None = None) -> None:
        """Drains, then stops the gRPC server, the worker and the metrics endpoint."""
        await self.drain(grace, force)
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.health.enter_graceful_shutdown()
        # Streams already ended; the short grace lets their final status frames flush.
        await self.grpc.stop(1.0)
        await asyncio.to_thread(self.engine.stop, 10.0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains: a second signal cuts the drain short."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    first = asyncio.Event()
    second = asyncio.Event()

    def on_signal() -> None:
        (second if first.is_set() else first).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.start()
    await first.wait()
    log.info("draining", extra={"grace_seconds": settings.grace_seconds, "active": server.engine.active_count()})
    await server.stop(settings.grace_seconds, second)
    log.info("stopped")
