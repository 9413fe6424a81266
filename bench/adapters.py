"""python -m bench.adapters: what one active LoRA costs, against the same requests without it, on one sdserve
server per model, at concurrency 1 (paired request by request, alternating order) and 4 (phases alternating).

The LoRA is made here for the bench model (rank 8 on the UNet's attention projections and the text encoder's),
so every attention projection runs its two extra low-rank matmuls: the cost of an unfused LoRA. sdserve never
fuses adapters (fusing writes into the shared base weights, and unfusing does not restore them bit for bit), so
there is no fused column. Writes bench/results/adapters.{md,json}."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import machine
from bench.driver import Driver
from bench.models import resolve_model
from bench.serverproc import ServerProcess
from bench.stats import Phase, RequestRecord, summarise
from bench.workload import Workload, plan
from sdserve import GenerationOptions

log = logging.getLogger("bench.adapters")
LORA = "bench-lora"
ROUNDS = 2


def make_adapter(model_dir: Path, adapters: Path) -> Path:
    """A rank-8 LoRA for the model's UNet and text encoder (random, non-zero weights), as an adapter folder."""
    from tests.adapter_models import make_lora

    folder = adapters / LORA
    make_lora(model_dir, folder, rank=8, seed=0)
    return folder


def _paired(driver: Driver, wl: Workload, lora: GenerationOptions) -> tuple[list[RequestRecord], list[RequestRecord]]:
    plain: list[RequestRecord] = []
    active: list[RequestRecord] = []
    for n, index in enumerate(wl.indices("c1", wl.latency_requests * 2)):
        if n % 2:
            active.append(driver.request(index, lora))
            plain.append(driver.request(index))
        else:
            plain.append(driver.request(index))
            active.append(driver.request(index, lora))
    return plain, active


def _phase(name: str, phases: list[Phase]) -> Phase:
    records = [r for p in phases for r in p.records]
    return summarise(name, phases[0].concurrency, records, sum(p.wall for p in phases))


def _c4(driver: Driver, wl: Workload, lora: GenerationOptions) -> tuple[Phase, Phase]:
    count = wl.throughput_requests[4]
    plain: list[Phase] = []
    active: list[Phase] = []
    all_indices = wl.indices("c4", count * ROUNDS)
    for r in range(ROUNDS):
        indices = all_indices[r * count : (r + 1) * count]
        plain.append(driver.run("plain", indices, 4))
        active.append(driver.run_with("lora", indices, 4, lora))
    return _phase("plain c=4", plain), _phase("lora c=4", active)


def run_key(key: str, threads: int, work: Path, quick: bool) -> dict[str, Any]:
    name, folder = resolve_model(key)
    wl = plan(key, name, folder, quick)
    adapters = work / key / "adapters"
    make_adapter(folder / name, adapters)
    flags = ["--torch-threads", str(threads), "--adapter-dirs", str(adapters), "--max-batch-images", "8"]
    srv = ServerProcess(wl.model, [wl.model_dir], work / key / "server.log", flags)
    try:
        srv.wait_serving()
        driver = Driver(srv.target, wl)
        lora = GenerationOptions(adapters=[(LORA, 1.0)])
        driver.warm_up(4)
        driver.request(0, GenerationOptions(steps=wl.warmup_steps, adapters=[(LORA, 1.0)]))
        c1_plain, c1_lora = _paired(driver, wl, lora)
        p1, l1 = _phase_of("plain c=1", c1_plain), _phase_of("lora c=1", c1_lora)
        p4, l4 = _c4(driver, wl, lora)
        driver.close()
    finally:
        srv.stop()
    return {
        "key": key,
        "model": wl.model,
        "size": f"{wl.width}x{wl.height}",
        "steps": wl.steps,
        "c1": {"plain_latency_s": p1.latency_mean, "lora_latency_s": l1.latency_mean},
        "c4": {"plain_images_per_s": p4.images_per_s, "lora_images_per_s": l4.images_per_s},
        "c1_cost": l1.latency_mean / p1.latency_mean - 1.0,
        "c4_cost": 1.0 - l4.images_per_s / p4.images_per_s,
    }


def _phase_of(name: str, records: list[RequestRecord]) -> Phase:
    return summarise(name, 1, records, sum(r.latency for r in records))


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# One active LoRA against no adapter",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']['cpu_model']}, {meta['machine']['affinity']} cores, "
        f"torch threads {meta['threads']}, commit {meta['machine']['git_commit']}",
        "",
        "| model | size, steps | c=1 latency, no adapter | c=1 latency, LoRA | LoRA cost c=1 "
        "| c=4 images/s, no adapter | c=4 images/s, LoRA | LoRA cost c=4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c1, c4 = r["c1"], r["c4"]
        lines.append(
            f"| {r['key']} | {r['size']}, {r['steps']} | {c1['plain_latency_s'] * 1000:.0f} ms "
            f"| {c1['lora_latency_s'] * 1000:.0f} ms | {r['c1_cost'] * 100:+.1f}% | {c4['plain_images_per_s']:.2f} "
            f"| {c4['lora_images_per_s']:.2f} | {r['c4_cost'] * 100:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.adapters", description=__doc__)
    ap.add_argument(
        "--models", default="tiny", help="comma-separated model keys (default tiny; small takes about 25 minutes)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smoke test: a few short requests")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sdserve-bench-adapters-"))
    rows = [run_key(k.strip(), args.threads, work, args.quick) for k in args.models.split(",") if k.strip()]
    meta = {
        "machine": machine.describe(args.threads),
        "threads": args.threads,
        "quick": args.quick,
        "duration_s": time.perf_counter() - started,
        "command": shlex.join(["python", "-m", "bench.adapters", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(meta, rows)
    (args.out / "adapters.md").write_text(text)
    (args.out / "adapters.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
