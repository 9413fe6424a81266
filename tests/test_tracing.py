"""OpenTelemetry tracing, recorded with the SDK's in-memory exporter: a live server's RPC span and its children (queue,
prepare, denoise, vae_decode, encode) in the caller's trace, continued from the Python client; no prompt text in any
attribute; nothing at all when tracing is off; the sidecar's import, verify and reconcile spans."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_manager.adapters import AdapterStore
from model_manager.hub import Hub
from model_manager.layout import StoreLayout
from model_manager.ops import Operations
from model_manager.reconcile import Reconciler
from model_manager.server import ManagerServer
from model_manager.settings import Settings as ManagerSettings
from model_manager.store import Store
from sdserve import Client
from sdserve.client import traced
from sdserve.models_client import ModelManagerClient
from sdserve_core import tracing as core_tracing
from service.requests import Outcome
from tests.harness import TINY, ServerThread, make_settings, wait_ledger, wait_until
from tests.test_batching import call, pair, run_batched

PROMPT = "a zebra-7f3a grazing in a meadow"
NEGATIVE = "blurry-91c2 watermark"
GENERATE = "/sdserve.v1.DiffusionService/Generate"
IMPORT = "/sdserve.v1.ModelManagerService/ImportModel"


def _recorder() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of the test's own (never the global one) that exports each span as it ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture()
def recorded() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider, exporter = _recorder()
    yield provider, exporter
    provider.shutdown()


@pytest.fixture(scope="module")
def traced_server(models_dir: Path) -> Iterator[tuple[ServerThread, TracerProvider, InMemorySpanExporter]]:
    """A live server tracing into an in-memory exporter (batches of up to 4 images, as test_batching's)."""
    provider, exporter = _recorder()
    srv = ServerThread(make_settings(models_dir, max_batch_images=4, batch_policy="fixed"), provider).start()
    yield srv, provider, exporter
    srv.stop()
    provider.shutdown()


def _values(span: ReadableSpan) -> list[str]:
    """Every attribute value of a span and of its events, as text."""
    attrs = [*(span.attributes or {}).values()]
    for event in span.events:
        attrs += [*(event.attributes or {}).values()]
    return [str(v) for v in attrs]


def _finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_generate_is_one_trace_from_the_client_to_the_encoder(
    traced_server: tuple[ServerThread, TracerProvider, InMemorySpanExporter],
) -> None:
    srv, provider, exporter = traced_server
    exporter.clear()
    with Client(srv.target) as client, provider.get_tracer("test").start_as_current_span("caller") as caller:
        client.generate(PROMPT, negative_prompt=NEGATIVE, steps=2, seed=3, num_images=2, request_id="traced-1")
    wait_until(lambda: _finished(exporter, GENERATE), "the server's RPC span")
    [rpc] = _finished(exporter, GENERATE)
    trace_id = caller.get_span_context().trace_id
    assert rpc.context is not None and rpc.context.trace_id == trace_id, "the client passed its context on"
    assert rpc.parent is not None and rpc.parent.span_id == caller.get_span_context().span_id
    assert rpc.kind is trace.SpanKind.SERVER
    attrs = rpc.attributes or {}
    assert attrs["sdserve.request_id"] == "traced-1" and attrs["sdserve.outcome"] == "ok"
    assert attrs["sdserve.model"] == TINY and attrs["sdserve.num_images"] == 2 and attrs["sdserve.steps"] == 2
    children = [
        s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == rpc.context.span_id
    ]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time or 0)]
    assert names == ["queue", "prepare", "denoise", "vae_decode", "encode"], names
    for child in children:
        assert child.context is not None and child.context.trace_id == trace_id
        c = child.attributes or {}
        assert c["sdserve.request_id"] == "traced-1" and c["sdserve.batch.size"] == 1, c
        assert c["sdserve.execution_profile"] == "exact" and c["sdserve.model.variant"], c
        assert child.start_time is not None and child.end_time is not None and child.start_time <= child.end_time
    [denoise] = [s for s in children if s.name == "denoise"]
    assert (denoise.attributes or {})["sdserve.denoise.pass"] == "base"
    assert not (denoise.attributes or {})["sdserve.stopped"]
    everything = [v for s in exporter.get_finished_spans() for v in _values(s)]
    assert everything and not [v for v in everything if "zebra" in v or "blurry-91c2" in v], "prompt text in a span"


def test_tracing_is_off_by_default(server: ServerThread, recorded: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """The shared default server: no interceptor, no tracer, and a traced caller's context goes nowhere."""
    provider, exporter = recorded
    assert server.server is not None
    assert server.server.tracing.tracer is None and server.server.tracing.interceptors() == []
    with Client(server.target) as client, provider.get_tracer("test").start_as_current_span("caller"):
        client.generate(PROMPT, steps=2, seed=3, request_id="untraced-1")
    assert wait_ledger(server, "untraced-1").outcome is Outcome.OK
    assert [s.name for s in exporter.get_finished_spans()] == ["caller"], "only the caller's own span"
    assert core_tracing.provider_from_environ("sdserve", {}) is None
    assert core_tracing.provider_from_environ("sdserve", {"OTEL_TRACES_EXPORTER": "none"}) is None
    off = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}
    assert core_tracing.provider_from_environ("sdserve", off) is None


def test_each_request_of_a_batch_has_its_own_spans(
    traced_server: tuple[ServerThread, TracerProvider, InMemorySpanExporter],
) -> None:
    srv, _, exporter = traced_server
    exporter.clear()
    ids = ["batched-0", "batched-1"]
    calls = [call("stream_generate", PROMPT, seed=i, steps=3, request_id=rid) for i, rid in enumerate(ids)]
    for outcome in run_batched(srv, calls):
        assert pair(outcome)[0].batch_size == 2
    wait_until(lambda: len(_finished(exporter, GENERATE)) == 3, "three RPC spans (the blocker's and the batch's)")
    rpcs = {str((s.attributes or {}).get("sdserve.request_id")): s for s in _finished(exporter, GENERATE)}
    denoises = []
    for rid in ids:
        ctx = rpcs[rid].context
        assert ctx is not None
        kids = {s.name: s for s in exporter.get_finished_spans() if s.parent and s.parent.span_id == ctx.span_id}
        assert sorted(kids) == ["denoise", "encode", "prepare", "queue", "vae_decode"], sorted(kids)
        assert all((k.attributes or {})["sdserve.batch.size"] == 2 for k in kids.values())
        denoises.append(kids["denoise"])
    assert denoises[0].start_time == denoises[1].start_time, "one pipeline call: the same times in both traces"
    assert denoises[0].context and denoises[1].context
    assert denoises[0].context.trace_id != denoises[1].context.trace_id
    [blocker] = [s for rid, s in rpcs.items() if rid not in ids]
    assert (blocker.attributes or {})["sdserve.outcome"] == "cancelled"
    assert blocker.context is not None
    [stopped] = [s for s in _finished(exporter, "denoise") if s.parent and s.parent.span_id == blocker.context.span_id]
    assert (stopped.attributes or {})["sdserve.stopped"] is True


def test_environment_turns_tracing_on() -> None:
    provider = core_tracing.provider_from_environ("sdserve-manager", {"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "sdserve-manager"
    finally:
        provider.shutdown()
    named = core_tracing.provider_from_environ(
        "sdserve", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "gpu-a"}
    )
    assert named is not None
    try:
        assert named.resource.attributes["service.name"] == "gpu-a"
    finally:
        named.shutdown()
    with pytest.raises(SystemExit, match="unknown exporter zipkin"):
        core_tracing.provider_from_environ("sdserve", {"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_client_passes_the_active_context_only(recorded: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, _ = recorded
    base = (("authorization", "Bearer k"),)
    assert traced(base) == base, "no active span: nothing added"
    with provider.get_tracer("test").start_as_current_span("caller") as span:
        md = dict(traced(base))
    ctx = span.get_span_context()
    assert md["authorization"] == "Bearer k"
    assert md["traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


class ManagerThread:
    """An in-process sidecar on its own event loop, with the test's tracer provider."""

    def __init__(self, settings: ManagerSettings, provider: TracerProvider):
        self.settings = settings
        self.provider = provider
        self.loop = asyncio.new_event_loop()
        self.server: ManagerServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self) -> int:
        # Built on its loop: a grpc.aio server belongs to the loop it was made on.
        self.server = ManagerServer(self.settings, tracer_provider=self.provider)
        return await self.server.start()

    def __enter__(self) -> ManagerThread:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def _manager_settings(tmp_path: Path, models_dir: Path) -> ManagerSettings:
    return ManagerSettings(
        store=tmp_path / "store",
        port=0,
        import_roots=(models_dir,),
        quality_check=False,
        min_free_bytes=0,
        metrics_port=-1,
        offline=True,
        log_format="text",
    )


def test_a_sidecar_import_traces_its_operation_and_verify(
    tmp_path: Path, models_dir: Path, recorded: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = recorded
    with ManagerThread(_manager_settings(tmp_path, models_dir), provider) as sidecar:
        caller = provider.get_tracer("test").start_as_current_span("caller")
        with ModelManagerClient(f"127.0.0.1:{sidecar.port}") as mc, caller as span:
            stored = mc.import_model(str(models_dir / TINY), name="traced").model
        wait_until(lambda: _finished(exporter, IMPORT), "the sidecar's RPC span")
    [rpc] = _finished(exporter, IMPORT)
    assert rpc.parent is not None and rpc.parent.span_id == span.get_span_context().span_id, "the client passes it"
    [op] = _finished(exporter, "import")
    [verify] = _finished(exporter, "verify")
    assert rpc.context is not None and op.context is not None and verify.context is not None
    assert op.parent is not None and op.parent.span_id == rpc.context.span_id, "the operation runs under its RPC"
    assert verify.parent is not None and verify.parent.span_id == op.context.span_id
    assert {s.context.trace_id for s in (rpc, op, verify) if s.context} == {rpc.context.trace_id}
    attrs = op.attributes or {}
    assert attrs["sdserve.model"] == "traced" and attrs["sdserve.model.revision"] == stored.revision
    assert int(str((verify.attributes or {})["sdserve.bytes"])) > 0


def test_a_reconcile_pass_is_one_trace(
    tmp_path: Path, models_dir: Path, recorded: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = recorded
    settings = _manager_settings(tmp_path, models_dir)
    layout = StoreLayout(settings.store)
    store = Store(layout, min_free_bytes=0)
    store.open()
    try:
        ops = Operations(settings, store, Hub("http://127.0.0.1:9", "", 5.0, True, layout.downloads), None,
                         provider.get_tracer("test"))  # fmt: skip
        declared = tmp_path / "declared.yaml"
        declared.write_text(
            f"models:\n  - name: tiny\n    source:\n      local:\n        path: {models_dir / TINY}\naliases:\n"
            "  default: tiny\n"
        )
        reconciler = Reconciler(declared, ops, AdapterStore(ops), poll_seconds=0.1, retry_seconds=0)
        assert reconciler.poll() and reconciler.ready()
    finally:
        store.close()
    [root] = _finished(exporter, "reconcile")
    assert root.parent is None and root.context is not None
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans if s.context} == {root.context.trace_id}
    entries = {str((s.attributes or {})["sdserve.declared.entry"]): s for s in _finished(exporter, "reconcile.entry")}
    assert sorted(entries) == ["aliases.default", "models[0]"]
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in entries.values())
    [op] = _finished(exporter, "import")
    model = entries["models[0]"].context
    assert model is not None and op.parent is not None and op.parent.span_id == model.span_id
    # One verify while publishing, one of the stored files by the pass, one before the alias moves.
    assert len(_finished(exporter, "verify")) == 3
