"""Prometheus metrics of the inference server; gauges of state and memory are read at scrape time."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class ServerMetrics:
    """Every metric the server exports, registered in its own registry (one per Server instance)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._register_request_metrics(self.registry)
        self._register_batch_metrics(self.registry)
        self._register_model_metrics(self.registry)

    def _register_request_metrics(self, r: CollectorRegistry) -> None:
        """Finished RPCs by outcome and the time requests spend queued, running, stepping and in total."""
        self.requests = Counter(
            "sdserve_requests",
            "Finished RPCs by method, model, weights variant, task, outcome "
            "(ok, invalid, not_found, failed_precondition, overloaded, cancelled, deadline, oom, unavailable, "
            "unauthenticated, internal) and transport (grpc, connect, grpc-web, a1111).",
            ["rpc", "model", "variant", "task", "outcome", "transport"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "sdserve_queue_seconds",
            "Time requests waited in the queue.",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "sdserve_inference_seconds",
            "Time from leaving the queue to the result (prepare, denoise, decode, encode).",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "sdserve_step_seconds",
            "Wall time of one denoising step of a pipeline call (all images of the batch), by model and the execution "
            "profile the call ran in (exact, or levers joined by '+').",
            ["model", "profile"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.first_progress_seconds = Histogram(
            "sdserve_first_progress_seconds",
            "Time from a request's arrival to its first progress event.",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "sdserve_request_seconds",
            "End-to-end time of finished generation RPCs by method, outcome and transport.",
            ["rpc", "outcome", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def _register_batch_metrics(self, r: CollectorRegistry) -> None:
        """Images returned, and the images and requests each pipeline call batches."""
        self.images = Counter("sdserve_images_generated", "Images returned to callers.", ["model", "task"], registry=r)
        self.batch_images = Histogram(
            "sdserve_batch_images", "Images per pipeline call.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "sdserve_batch_requests", "Requests per pipeline call.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.memory_calls = Counter(
            "sdserve_memory_strategy_calls",
            "Pipeline calls by the memory strategies they ran with (strategy: sorted names comma-joined, or none; "
            "see GetServerInfo.memory).",
            ["model", "strategy"],
            registry=r,
        )

    def _register_model_metrics(self, r: CollectorRegistry) -> None:
        """Model load times, alias hot swaps and prompt-embedding cache lookups."""
        self.model_load_seconds = Histogram(
            "sdserve_model_load_seconds",
            "Time to load a model onto the device.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps = Counter("sdserve_model_swaps", "Alias hot swaps by result (ok, failed).", ["result"], registry=r)
        self.prompt_cache = Counter(
            "sdserve_prompt_cache_lookups",
            "Prompt-embedding cache lookups by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.adapter_lookups = Counter(
            "sdserve_adapter_lookups",
            "LoRA lookups in the adapter pool by result (hit: loaded in the model already; miss: loaded now).",
            ["result"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "sdserve_adapter_evictions", "LoRAs unloaded to keep the adapter pool within its bytes.", registry=r
        )
        self.adapter_bytes = Gauge(
            "sdserve_adapter_pool_bytes",
            "Bytes of LoRA weights loaded into models (adapter_pool_bytes bounds it).",
            registry=r,
        )
        self.adapter_entries = Gauge("sdserve_adapter_pool_entries", "LoRA loads held in models.", registry=r)

    def add_collector(self, collector: Collector) -> None:
        """Registers a scrape-time collector."""
        self.registry.register(collector)


class StateCollector(Collector):
    """Queue depth, in-flight requests, loaded models and memory, computed when Prometheus scrapes."""

    def __init__(
        self,
        queue_depths: Callable[[], dict[str, int]],
        in_flight: Callable[[], int],
        loaded_models: Callable[[], Iterable[tuple[str, str, str, str, bool]]],
        device: torch.device,
        extra: Callable[[], Iterable[Metric]] | None = None,
    ):
        self._queue_depths = queue_depths
        self._in_flight = in_flight
        self._loaded = loaded_models
        self._device = device
        self._extra = extra
        self._process = psutil.Process(os.getpid())

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("sdserve_queue_depth", "Requests waiting in the queue.", labels=["model"])
        for model, n in sorted(self._queue_depths().items()):
            depth.add_metric([model], n)
        yield depth
        yield GaugeMetricFamily("sdserve_in_flight_requests", "Requests started and not finished.", self._in_flight())
        loaded = GaugeMetricFamily(
            "sdserve_model_loaded",
            "1 when the model's weights are loaded on the device, by served identity (model, revision, stored weights "
            "variant) and the dtype it computes in.",
            labels=["model", "revision", "variant", "dtype"],
        )
        for name, revision, variant, dtype, is_loaded in self._loaded():
            loaded.add_metric([name, revision, variant, dtype], 1.0 if is_loaded else 0.0)
        yield loaded
        yield GaugeMetricFamily(
            "sdserve_process_resident_memory_bytes",
            "Resident set size of the server process.",
            self._process.memory_info().rss,
        )
        yield from device_memory(self._device)
        if self._extra is not None:
            yield from self._extra()


def device_memory(device: torch.device) -> Iterable[Metric]:
    """torch allocator figures and device totals where the backend reports them (CUDA, XPU, MPS)."""
    label = [str(device)]
    stats: dict[str, float] = {}
    if device.type == "cuda" and torch.cuda.is_available():
        stats["allocated"] = torch.cuda.memory_allocated(device)
        stats["reserved"] = torch.cuda.memory_reserved(device)
        stats["peak"] = torch.cuda.max_memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        stats["free"], stats["total"] = free, total
    elif device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        stats["allocated"] = torch.xpu.memory_allocated(device)
        stats["reserved"] = torch.xpu.memory_reserved(device)
        stats["peak"] = torch.xpu.max_memory_allocated(device)
    elif device.type == "mps" and torch.backends.mps.is_available():
        stats["allocated"] = torch.mps.current_allocated_memory()
        stats["reserved"] = torch.mps.driver_allocated_memory()
    names = {
        "allocated": ("sdserve_device_allocated_bytes", "Bytes held by torch tensors on the device."),
        "reserved": ("sdserve_device_reserved_bytes", "Bytes reserved by torch's caching allocator."),
        "peak": ("sdserve_device_peak_allocated_bytes", "Peak bytes held by tensors since start."),
        "free": ("sdserve_device_free_bytes", "Free device memory reported by the driver."),
        "total": ("sdserve_device_total_bytes", "Total device memory reported by the driver."),
    }
    for key, value in stats.items():
        name, doc = names[key]
        family = GaugeMetricFamily(name, doc, labels=["device"])
        family.add_metric(label, float(value))
        yield family
