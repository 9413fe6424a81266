"""bench/gpu.sh's CPU dry run (tiny SD 1.x and SDXL models, float32, 2 steps, batches 1 and 2) runs end to end and
reports what the GPU run reports: both model families, direct and sdserve:exact at both batch sizes, finite timings,
a fraction of the matmul peak, and sdserve:exact's first images equal to direct diffusers' pixel for pixel."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from bench import gpu
from sdserve_core import profiles
from service.settings import REPO_ROOT


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Runs `bench/gpu.sh --dry-run` once (this interpreter, one OpenMP thread unless set): its JSON and the folder
    of first images."""
    tmp_path = tmp_path_factory.mktemp("gpu")
    out, images = tmp_path / "gpu.json", tmp_path / "images"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [str(REPO_ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out), "--images", str(images)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| sdxl | 64 | 2 | sdserve:exact |" in done.stdout
    report: dict[str, Any] = json.loads(out.read_text())
    return report, images


def first_image(folder: Path, model: str, batch: int, runner: str) -> np.ndarray:
    """A measurement's first image as written under --images."""
    with Image.open(folder / gpu.image_name(model, batch, runner)) as image:
        return np.asarray(image.convert("RGB"))


def test_the_dry_run_reports_every_model_batch_and_runner(dry_run: tuple[dict[str, Any], Path]) -> None:
    report, _ = dry_run
    rows = report["results"]
    assert report["skipped"] == []
    assert report["settings"]["complete"] and report["settings"]["dry_run"]
    assert report["peak_flops"]["device"] == "cpu" and report["peak_flops"]["flops"] > 0
    assert {"torch", "diffusers", "gpu", "cuda"} <= set(report["machine"])
    found = {(r["model"], r["batch"], r["runner"]) for r in rows}
    for model in ("sd15", "sdxl"):
        assert report["models"][model]["flops_per_image_step"] > 1e7
        for batch in (1, 2):
            assert {(model, batch, "direct"), (model, batch, "sdserve:exact")} <= found
    for r in rows:
        assert r["size"] == 64 and r["steps"] == 2
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert math.isfinite(r["seconds_per_image_step"]) and r["seconds_per_image_step"] > 0
        assert 0 < r["fraction_of_peak"] < 1.5
        assert r["warmup_seconds"] > 0 and r["peak_memory_bytes"] is None


def test_sdserve_exact_makes_the_same_pixels_as_direct_diffusers(dry_run: tuple[dict[str, Any], Path]) -> None:
    report, images = dry_run
    exact = [r for r in report["results"] if r["runner"] == "sdserve:exact"]
    assert len(exact) == 4
    for r in exact:
        assert r["same_pixels_as_direct"] is True
        direct = first_image(images, r["model"], r["batch"], "direct")
        served = first_image(images, r["model"], r["batch"], "sdserve:exact")
        assert direct.shape == (64, 64, 3)
        assert np.array_equal(direct, served)


def test_the_gpu_plan_measures_direct_and_exact_then_compile_at_batch_1_first() -> None:
    models = [gpu.Model("sd15", Path("sd15"), 512), gpu.Model("sdxl", Path("sdxl"), 1024)]
    jobs = gpu.plan(models, gpu.setup_for(dry_run=False, budget_s=420.0, images=None))
    order = [(j.model.key, j.runner, j.batch) for j in jobs]
    assert order[:8] == [
        (model, runner, batch)
        for model in ("sd15", "sdxl")
        for runner in ("direct", "sdserve:exact")
        for batch in (1, 8)
    ]
    assert order[8:12] == [(model, "sdserve:compile", batch) for batch in (1, 8) for model in ("sd15", "sdxl")]
    others = {f"sdserve:{p.name}" for p in profiles.candidates("cuda", torch.float16, with_compile=True)}
    assert {j.runner for j in jobs[12:]} == others - {"sdserve:exact", "sdserve:compile"}
    assert len(jobs) == 2 * 2 * (1 + len(others))


def test_a_spent_budget_skips_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    setup = gpu.setup_for(dry_run=True, budget_s=0.0, images=None)
    jobs = gpu.plan([gpu.build_model("sd15", dry_run=True)], setup)
    gpu.run_plan(jobs, gpu.Report({}, {"dtype": "float32", "flops": 1.0}, {}), setup, time.perf_counter(), out)
    report = json.loads(out.read_text())
    assert report["results"] == []
    assert [(s["runner"], s["batch"]) for s in report["skipped"]] == [
        ("direct", 1),
        ("direct", 2),
        ("sdserve:exact", 1),
        ("sdserve:exact", 2),
    ]
    assert all(s["reason"].startswith("time budget:") for s in report["skipped"])
