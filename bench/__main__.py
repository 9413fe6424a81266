"""python -m bench: diffusers directly versus sdserve end to end, per model; writes bench/results/."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import machine, report, targets
from bench.models import resolve_model
from bench.suite import ServerSettings, run_model
from bench.workload import plan

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--models", default="tiny,small", help="comma-separated: tiny, small, sd15, sdxl (default tiny,small)"
    )
    ap.add_argument("--quick", action="store_true", help="a few short requests per phase: a smoke test")
    ap.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="folder for the report (default %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both ways (default %(default)s)")
    ap.add_argument("--max-batch-images", type=int, default=8, help="sdserve's batching limit (default %(default)s)")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0, help="sdserve's batch wait (default %(default)s)")
    ap.add_argument("--keep-work", action="store_true", help="keep server logs and images in OUT/work")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work" if args.keep_work else Path(tempfile.mkdtemp(prefix="sdserve-bench-"))
    settings = ServerSettings(args.threads, args.max_batch_images, args.batch_wait_ms)
    started = time.perf_counter()
    loaded_before = machine.other_load()
    meta: dict[str, Any] = {"machine": machine.describe(args.threads), "quick": args.quick}
    results: list[dict[str, Any]] = []
    checks: list[targets.Check] = []
    try:
        for key in keys:
            name, folder = resolve_model(key)
            wl = plan(key, name, folder, args.quick)
            log.info("model %s: %s in %s, %dx%d, %d steps", key, name, folder, wl.width, wl.height, wl.steps)
            result = run_model(wl, settings, work / key)
            results.append(result)
            checks += targets.check(result)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    loaded_after = machine.other_load()
    meta["other_load"] = sorted(set(loaded_before) | set(loaded_after))
    meta["load_average_end"] = machine.describe(args.threads)["load_average"]
    meta["duration_s"] = time.perf_counter() - started
    env = [f"{k}={v}" for k, v in meta["machine"]["env"].items()]
    meta["command"] = " ".join([*env, shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])])
    meta["settings"] = {"max_batch_images": args.max_batch_images, "batch_wait_ms": args.batch_wait_ms}
    text = report.markdown(meta, results, checks)
    (out / "results.md").write_text(text)
    report.write_json(out / "results.json", meta, results, checks)
    if report.plot(out / "throughput.png", results):
        text += "\n![images/s against concurrency](throughput.png)\n"
        (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
