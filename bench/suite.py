"""One model's measurements: the direct baseline, sdserve with batching off and sdserve with batching on."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.direct import DirectProcess
from bench.driver import Driver
from bench.serverproc import ServerProcess
from bench.stats import Phase, RequestRecord, summarise
from bench.workload import Workload

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the sdserve children are started."""

    threads: int
    max_batch_images: int
    batch_wait_ms: float


def image_diff(direct_dir: Path, served: dict[int, bytes]) -> int:
    """Largest per-channel difference (0-255) between the baseline's and sdserve's images of the same requests."""
    worst = 0
    for index, data in served.items():
        path = direct_dir / f"{index}.png"
        if not path.is_file():
            continue
        a = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def _with_step(trials: list[dict[str, float]], c1: Phase, steps: int) -> list[dict[str, float]]:
    """Adds the reference step time: the server's mean denoising time per step at concurrency 1.

    Progress events can reach the client in bursts, so client-side gaps between them understate a step.
    """
    step = c1.server_mean.get("denoise", float("nan")) / steps
    return [{**t, "step": step} for t in trials]


def _server(wl: Workload, workdir: Path, name: str, flags: list[str]) -> ServerProcess:
    srv = ServerProcess(wl.model, [wl.model_dir], workdir / f"server-{name}.log", flags)
    try:
        srv.wait_serving()
    except BaseException:
        srv.stop()
        raise
    log.info("%s: sdserve (%s) SERVING after %.2f s", wl.key, name, srv.cold_start_s)
    return srv


def _paired_c1(
    wl: Workload, direct: DirectProcess, off: Driver, on: Driver
) -> tuple[list[RequestRecord], list[RequestRecord], list[RequestRecord]]:
    """Concurrency 1, the same requests three ways, interleaved request by request in rotating order so that
    a change in machine load hits all three alike."""
    runners: list[Callable[[int], RequestRecord]] = [direct.request, off.request, on.request]
    results: list[list[RequestRecord]] = [[], [], []]
    for n, index in enumerate(wl.indices("c1", wl.latency_requests)):
        for k in range(3):
            which = (n + k) % 3
            results[which].append(runners[which](index))
    return results[0], results[1], results[2]


def _sequential(name: str, records: list[RequestRecord]) -> Phase:
    """A concurrency-1 phase whose images/s is that of running its requests back to back: 1 / mean latency."""
    return summarise(name, 1, records, sum(r.latency for r in records))


def run_model(wl: Workload, settings: ServerSettings, workdir: Path) -> dict[str, Any]:
    """Runs every measurement for one model; returns them as plain data (phases as Phase objects).

    Order: start the baseline child, then sdserve with batching off, then with batching on (each cold start
    alone); concurrency 1 interleaved across all three; the baseline stops; previews and cancels on the
    batching-off server, which stops; concurrency 4 and 8 and cancels on the batching-on server.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "key": wl.key,
        "model": wl.model,
        "width": wl.width,
        "height": wl.height,
        "steps": wl.steps,
        "guidance": wl.guidance,
        "plan": {
            "latency_requests": wl.latency_requests,
            "throughput_requests": wl.throughput_requests,
            "preview_rounds": wl.preview_rounds,
            "cancel_trials": wl.cancel_trials,
            "cancel_after_step": wl.cancel_after_step,
        },
    }
    common = ["--torch-threads", str(settings.threads)]
    off_flags = [*common, "--max-batch-images", "1", "--batch-wait-ms", "0"]
    on_flags = [
        *common,
        "--max-batch-images",
        str(settings.max_batch_images),
        "--batch-wait-ms",
        f"{settings.batch_wait_ms:g}",
    ]
    with contextlib.ExitStack() as stack:
        log.info("%s: starting the direct diffusers baseline", wl.key)
        direct = DirectProcess(wl, settings.threads, workdir)
        stack.callback(direct.close)
        log.info("%s: baseline loaded and warmed after %.2f s", wl.key, direct.info["cold_start_s"])
        off_srv = _server(wl, workdir, "batching-off", off_flags)
        stack.callback(off_srv.stop)
        on_srv = _server(wl, workdir, "batching-on", on_flags)
        stack.callback(on_srv.stop)
        off_drv = Driver(off_srv.target, wl)
        stack.callback(off_drv.close)
        on_drv = Driver(on_srv.target, wl)
        stack.callback(on_drv.close)
        off: dict[str, Any] = {"cold_start_s": off_srv.cold_start_s, "flags": off_flags}
        on: dict[str, Any] = {"cold_start_s": on_srv.cold_start_s, "flags": on_flags, "warmup_s": {}}
        off["warmup_s"] = off_drv.warm_up(1)
        on["warmup_s"][1] = on_drv.warm_up(1)

        log.info("%s: concurrency 1, %d requests each way, interleaved", wl.key, wl.latency_requests)
        d_rec, off_rec, on_rec = _paired_c1(wl, direct, off_drv, on_drv)
        out["direct"] = {
            "phase": _sequential("direct", d_rec),
            "peak_rss": direct.peak_rss(),
            "pipeline": direct.pipeline,
            **direct.info,
        }
        direct.close()
        off["c1"] = _sequential("c1", off_rec)
        on["c1"] = _sequential("c1-batch", on_rec)
        off["image_max_diff_vs_direct"] = image_diff(direct.png_dir, off_drv.images)
        on["image_max_diff_vs_direct"] = image_diff(direct.png_dir, on_drv.images)
        # The same first requests with precision exact: the exact profile must equal direct diffusers bit for bit.
        off["exact_image_max_diff_vs_direct"] = image_diff(direct.png_dir, off_drv.exact_images(2))
        off["profiles"] = off_drv.profiles()
        on["peak_rss_c1"] = on_srv.peak_rss()

        log.info("%s: previews, %d rounds", wl.key, wl.preview_rounds)
        off["previews"] = off_drv.previews(wl.preview_rounds)
        log.info("%s: cancels, %d trials", wl.key, wl.cancel_trials)
        off["cancels"] = _with_step(off_drv.cancels(wl.cancel_trials, wl.cancel_after_step), off["c1"], wl.steps)
        off["peak_rss"] = off_srv.peak_rss()
        off_drv.close()
        off_srv.stop()
        out["sdserve_off"] = off

        # One round at the highest concurrency allocates the largest batches (and runs any lazy calibration).
        top = max(wl.throughput_requests)
        on["warmup_s"][top] = on_drv.warm_up(top)
        for conc, count in sorted(wl.throughput_requests.items()):
            log.info("%s: sdserve batching on, concurrency %d, %d requests", wl.key, conc, count)
            on[f"c{conc}"] = on_drv.run(f"c{conc}", wl.indices(f"c{conc}", count), conc)
        on["batch_limits"] = on_drv.batch_limits()
        on["cancels"] = _with_step(on_drv.cancels(wl.cancel_trials, wl.cancel_after_step), on["c1"], wl.steps)
        on["peak_rss"] = on_srv.peak_rss()
        out["sdserve_on"] = on
    return out
