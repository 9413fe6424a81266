"""Facts about the machine the benchmark ran on, and whether something else was loading it."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil


def cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def other_load() -> list[str]:
    """Other CPU-heavy processes right now: training runs, and anything over 20% CPU that is not ours."""
    found: list[str] = []
    ours = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = list(psutil.process_iter(["pid", "cmdline"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            continue
    # One short sampling window: cpu_percent needs two readings of each process's CPU time.
    psutil.cpu_percent(0.5)
    for p in procs:
        if p.pid in ours:
            continue
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if "training." in cmd or pct > 20.0:
            found.append(f"pid {p.pid} ({pct:.0f}% CPU): {cmd[:120]}")
    return found


def describe(threads: int) -> dict[str, object]:
    """nproc, CPU model, memory, versions and the load average at this moment."""
    import diffusers
    import torch
    import transformers

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        # OpenMP settings change CPU results a lot on a shared machine (spin-waiting threads); both sides inherit them.
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit,
    }
