"""Drives a running sdserve through the Python client: timed requests, concurrency, previews, cancels."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from bench import workload
from bench.stats import Phase, RequestRecord, median, summarise
from bench.workload import Workload
from sdserve import Client, GenerationOptions, Progress, Queued, Result, SdserveError, Started


class Driver:
    """Sends the workload's requests to one server; every call goes over one shared channel."""

    def __init__(self, target: str, wl: Workload):
        self.client = Client(target)
        self.wl = wl
        self.images: dict[int, bytes] = {}

    def close(self) -> None:
        self.client.close()

    def _options(self, index: int, extra: GenerationOptions | None = None) -> GenerationOptions:
        opts = GenerationOptions(
            model=self.wl.model,
            width=self.wl.width,
            height=self.wl.height,
            steps=self.wl.steps,
            guidance_scale=self.wl.guidance,
            seed=workload.seed(index),
        )
        opts.update(extra or {})
        return opts

    def request(self, index: int, extra: GenerationOptions | None = None) -> RequestRecord:
        """Runs request `index` (workload parameters, overridden by `extra`) and times what the caller sees."""
        opts = self._options(index, extra)
        start = time.perf_counter()
        started = first = 0.0
        batch = 1
        marks: list[float] = []
        record: RequestRecord | None = None
        stream = self.client.stream_generate(workload.prompt(index), **opts)
        for ev in stream:
            now = time.perf_counter()
            if isinstance(ev, Started):
                started, batch = now - start, ev.batch_size
            elif isinstance(ev, Progress):
                first = first or now - start
                marks.append(now)
            elif isinstance(ev, Result):
                record = RequestRecord(
                    index=index,
                    latency=now - start,
                    first_progress=first,
                    started=started,
                    batch_size=batch,
                    step_times=tuple(b - a for a, b in itertools.pairwise(marks)),
                    server=dataclasses.asdict(ev.timings),
                )
                self.images[index] = ev.image.data
        # The loop reads on to the stream's end (OK status) so the call completes rather than being dropped.
        if record is None:
            raise SdserveError("UNKNOWN", f"request {index} ended without a result")
        return record

    def warm_up(self, concurrency: int) -> float:
        """`concurrency` short requests at once, so first-batch allocation (and any calibration) is not timed."""
        indices = self.wl.indices("warmup", concurrency)
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda i: self.request(i, GenerationOptions(steps=self.wl.warmup_steps)), indices))
        return time.perf_counter() - start

    def run(self, name: str, indices: Sequence[int], concurrency: int) -> Phase:
        """Runs `indices` with at most `concurrency` in flight; images/s over the whole phase's wall time."""
        return self.run_with(name, indices, concurrency, None)

    def run_with(self, name: str, indices: Sequence[int], concurrency: int, extra: GenerationOptions | None) -> Phase:
        """As run, each request with `extra` options (adapters, for example)."""
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            records = list(pool.map(lambda i: self.request(i, extra), indices))
        return summarise(name, concurrency, records, time.perf_counter() - start)

    def previews(self, rounds: int) -> dict[str, Phase]:
        """Interleaved rounds of: no previews, LATENT_RGB every step, FULL_VAE every 5 steps (each its own prompt)."""
        variants: dict[str, GenerationOptions] = {
            "none": GenerationOptions(),
            "latent_rgb_every_1": GenerationOptions(preview="latent_rgb", preview_every=1),
            "full_vae_every_5": GenerationOptions(preview="full_vae", preview_every=5),
        }
        records: dict[str, list[RequestRecord]] = {k: [] for k in variants}
        walls = dict.fromkeys(variants, 0.0)
        indices = iter(self.wl.indices("preview", rounds * len(variants)))
        for _ in range(rounds):
            for name, extra in variants.items():
                t = time.perf_counter()
                records[name].append(self.request(next(indices), extra))
                walls[name] += time.perf_counter() - t
        return {k: summarise(f"preview-{k}", 1, v, walls[k]) for k, v in records.items()}

    def cancel_trial(self, index: int, after_step: int) -> dict[str, float]:
        """Cancels request A right after its step `after_step`; B waits behind it. Returns the cancel latency
        (cancel sent to B's Started event: the slot is free) and A's median step time as the client saw it."""
        b_queued = threading.Event()
        b_started = threading.Event()
        b_started_at = [0.0]

        def run_b() -> None:
            stream = self.client.stream_generate(workload.prompt(index + 1), **self._options(index + 1))
            try:
                for ev in stream:
                    if isinstance(ev, Queued):
                        b_queued.set()
                    elif isinstance(ev, Started):
                        b_started_at[0] = time.perf_counter()
                        b_started.set()
                        stream.cancel()
            except SdserveError:
                pass
            finally:
                b_queued.set()
                b_started.set()

        b_thread = threading.Thread(target=run_b, daemon=True)
        stream = self.client.stream_generate(workload.prompt(index), **self._options(index))
        marks: list[float] = []
        cancelled_at = 0.0
        try:
            for ev in stream:
                if isinstance(ev, Started):
                    b_thread.start()
                elif isinstance(ev, Progress):
                    marks.append(time.perf_counter())
                    if ev.step == after_step:
                        b_queued.wait(60)
                        cancelled_at = time.perf_counter()
                        stream.cancel()
        except SdserveError as err:
            if err.code != "CANCELLED":
                raise
        b_started.wait(600)
        b_thread.join(60)
        if not cancelled_at or not b_started_at[0]:
            raise RuntimeError("cancel trial: A finished before the cancel, or B never started")
        steps = [b - a for a, b in itertools.pairwise(marks)]
        return {"cancel_latency": b_started_at[0] - cancelled_at, "step_client": median(steps)}

    def cancels(self, trials: int, after_step: int) -> list[dict[str, float]]:
        base = self.wl.indices("cancel", 2 * trials)
        return [self.cancel_trial(base[2 * t], after_step) for t in range(trials)]

    def profiles(self) -> list[dict[str, object]]:
        """The server's execution profiles (GetServerInfo.profiles): each model's profile and its trials."""
        info = self.client.server_info()
        return [
            {
                "model": p.model,
                "profile": p.profile,
                "source": p.source,
                "seconds": p.seconds,
                "trials": [{"profile": t.profile, "seconds_per_step": t.seconds_per_step} for t in p.trials],
            }
            for p in info.profiles
        ]

    def exact_images(self, count: int) -> dict[int, bytes]:
        """Requests 0 .. count-1 again with precision exact, for the equality check against direct diffusers."""
        for index in range(count):
            self.request(index, GenerationOptions(precision="exact"))
        return {i: self.images[i] for i in range(count)}

    def batch_limits(self) -> list[dict[str, object]]:
        """The server's chosen batch limits (GetServerInfo.batch_limits), if it reports any."""
        info = self.client.server_info()
        return [
            {
                "model": b.model,
                "width": b.width,
                "height": b.height,
                "max_batch_images": b.max_batch_images,
                "source": b.source,
            }
            for b in info.batch_limits
        ]
