"""Request tracing: the RPC span's children (queue, prepare, denoise, vae_decode, encode), made on the device worker
from the context each Job captured when it was admitted. Attributes name the served identity and the sizes; never a
prompt."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from sdserve_core import tracing as core_tracing

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from sdserve_core.pipeline.steps import StepCallback
    from service.jobs import Job
    from service.requests import Outcome, ResolvedRequest

# The server's tracer travels in the OpenTelemetry context from the servicer to the Job it admits (the Job is built
# inside Admission.submit and may reach the worker thread before submit returns).
_TRACER = otel_context.create_key("sdserve-tracer")


class Tracing:
    """One server's tracing: its RPC interceptor and the tracer of request spans. `provider` None: off, and then
    nothing is installed and no span is made."""

    def __init__(self, provider: trace.TracerProvider | None):
        self.provider = provider
        self.tracer = None if provider is None else provider.get_tracer("sdserve.service")

    def interceptors(self) -> list[Any]:
        return core_tracing.server_interceptors(self.provider)

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Around Admission.submit: a Job built inside captures the current RPC span (see `capture`)."""
        if self.tracer is None:
            yield
            return
        token = otel_context.attach(otel_context.set_value(_TRACER, self.tracer))
        try:
            yield
        finally:
            otel_context.detach(token)


@dataclasses.dataclass(frozen=True)
class JobTrace:
    """Where a job's spans go: under the RPC span `rpc` (its context `parent`), made by `tracer`."""

    tracer: trace.Tracer
    parent: otel_context.Context
    rpc: trace.Span

    def span(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, AttributeValue]) -> None:
        """A finished child span of the RPC span (made after the fact, with its own times)."""
        span = self.tracer.start_span(name, context=self.parent, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))


def capture(resolved: ResolvedRequest) -> JobTrace | None:
    """The trace of a job being admitted: the current RPC span when it records and the servicer is `admitting`
    (None otherwise: tracing off, another transport, or not sampled). Tags the RPC span with the request."""
    tracer = otel_context.get_value(_TRACER)
    if not isinstance(tracer, trace.Tracer):
        return None
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    span.set_attributes(attributes(resolved))
    return JobTrace(tracer, otel_context.get_current(), span)


def attributes(r: ResolvedRequest, batch: int = 0) -> dict[str, AttributeValue]:
    """The request's span attributes (never its prompts), with the batch size when `batch` is set."""
    out: dict[str, AttributeValue] = {
        "sdserve.request_id": r.request_id,
        "sdserve.task": r.task.value,
        "sdserve.model": r.model,
        "sdserve.model.revision": r.model_revision,
        "sdserve.model.variant": r.variant,
        "sdserve.steps": r.steps,
        "sdserve.width": r.width,
        "sdserve.height": r.height,
        "sdserve.num_images": r.num_images,
        "sdserve.execution_profile": r.execution_profile,
    }
    if batch:
        out["sdserve.batch.size"] = batch
    return out


def finished(job: Job | None, outcome: Outcome) -> None:
    """Tags the RPC span with how the request ended (and the profile it ran in) while the span is still open."""
    span = job.trace.rpc if job is not None and job.trace is not None else trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("sdserve.outcome", outcome.value)
    if job is not None:
        span.set_attribute("sdserve.execution_profile", job.resolved.execution_profile)


def wall_ns(*readings: float, clock: Callable[[], float] = time.perf_counter) -> list[int]:
    """`readings` of `clock` as wall-clock nanoseconds (what spans carry), against one reference."""
    now_ns, now = time.time_ns(), clock()
    return [now_ns - round((now - t) * 1e9) for t in readings]


def queued(jobs: list[Job]) -> None:
    """Each started job's `queue` span: from its arrival in the queue to the start of its batch."""
    for job in jobs:
        if job.trace is not None and job.started_at is not None:
            start, end = wall_ns(job.enqueued_at, job.started_at, clock=time.monotonic)
            job.trace.span("queue", start, end, attributes(job.resolved, len(jobs)))


def span(job: Job, name: str, start: float, end: float, batch: int, **extra: AttributeValue) -> None:
    """One child span of `job`'s RPC span between two perf_counter readings (nothing when it is not traced)."""
    if job.trace is not None:
        start_ns, end_ns = wall_ns(start, end)
        job.trace.span(name, start_ns, end_ns, {**attributes(job.resolved, batch), **extra})


class BatchTrace:
    """The spans of one pipeline call: each traced job of the batch gets its own copy of each (same times, with
    the batch size), so every request's trace is complete on its own."""

    def __init__(self, jobs: list[Job]):
        self._jobs = [j for j in jobs if j.trace is not None]
        self._batch = len(jobs)

    def mark(self, name: str, start: float, end: float, **extra: AttributeValue) -> None:
        """A span between two perf_counter readings, for each traced job."""
        start_ns, end_ns = wall_ns(start, end)
        for job in self._jobs:
            assert job.trace is not None
            job.trace.span(name, start_ns, end_ns, {**attributes(job.resolved, self._batch), **extra})

    @contextlib.contextmanager
    def denoise(self, denoise_pass: str, clock: StepCallback) -> Iterator[None]:
        """A `denoise` span around one pass: it ends at the pass's last step (the VAE decode that may follow
        inside the same pipeline call is `vae_decode`), or when the pass stops early."""
        if not self._jobs:
            yield
            return
        start = time.perf_counter()
        stopped = True
        try:
            yield
            stopped = False
        finally:
            end = time.perf_counter() if stopped else clock.last or time.perf_counter()
            extra: dict[str, AttributeValue] = {"sdserve.denoise.pass": denoise_pass, "sdserve.stopped": stopped}
            self.mark("denoise", start, end, **extra)
