"""OpenTelemetry set-up shared by the server and the sidecar: off unless the standard OTEL_* variables turn it on.

The OTEL_* variables are OpenTelemetry's own, not sdserve settings: the SDK reads them as well (the sampler from
OTEL_TRACES_SAMPLER, the OTLP exporter from OTEL_EXPORTER_OTLP_*, the batch processor from OTEL_BSP_*), so this
module reads them too rather than copying each into the settings object. Tests pass a provider of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import TracerProvider as ApiTracerProvider

# Exporter names OTEL_TRACES_EXPORTER may list (comma-separated); "none" alone turns tracing off.
EXPORTERS = ("otlp", "console")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names; empty when tracing is off (unset, `none`, or OTEL_SDK_DISABLED)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise SystemExit(f"OTEL_TRACES_EXPORTER: unknown exporter {', '.join(unknown)} (use otlp, console or none)")
    return names


def _exporter(name: str) -> SpanExporter:
    if name == "otlp":
        # gRPC OTLP; it reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _CERTIFICATE, _TIMEOUT, ... itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


def provider_from_environ(default_service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting through a batch processor to the exporters OTEL_TRACES_EXPORTER names, with
    `service.name` from OTEL_SERVICE_NAME (else `default_service_name`); None when tracing is off, the default.
    The provider is the process's own: it is never installed as OpenTelemetry's global one."""
    environ = os.environ if environ is None else environ
    names = exporter_names(environ)
    if not names:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = environ.get("OTEL_SERVICE_NAME", "").strip() or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    return provider


def server_interceptors(provider: ApiTracerProvider | None) -> list[Any]:
    """The grpc.aio server interceptor that makes one span per RPC (continuing the caller's W3C traceparent; not
    for health checks and reflection), or nothing when tracing is off: then no instrumentation is installed."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    # Health probes (every few seconds from every kubelet) and reflection would drown the requests' traces.
    quiet = filters.any_of(filters.service_prefix("grpc.health."), filters.service_prefix("grpc.reflection."))
    return [aio_server_interceptor(tracer_provider=provider, filter_=filters.negate(quiet))]


def shutdown(provider: ApiTracerProvider | None) -> None:
    """Flushes and closes `provider`'s exporters (at the end of serving); nothing when tracing is off."""
    close = getattr(provider, "shutdown", None)
    if close is not None:
        close()
