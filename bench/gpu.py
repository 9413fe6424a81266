"""One-shot GPU benchmark: diffusers called directly (fp16, SDPA) against sdserve's execution profiles, on full-size
SD 1.5- and SDXL-shaped random-weight models at batch 1 and 8, within a time budget.

    bench/gpu.sh                                          # CUDA: bench/results/gpu.json, under 8 minutes on an H100
    python -m bench.gpu --dry-run --out /tmp/gpu.json     # CPU, float32, tiny models, seconds: what `make test` runs

Writes one JSON file (the machine, the measured matmul peak, one row per model, batch and runner, and what the time
budget or an error skipped) after every measurement, and prints a table at the end. See bench/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench import machine
from bench.direct import SDXL_PIPELINES, pipeline_class
from bench.models import CACHE, resolve_model, sdxl_model
from bench.roofline import matmul_peak, step_flops, unet_inputs
from sdserve_core import profiles
from sdserve_core.components import Components, load_components
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import run
from sdserve_core.pipeline.steps import StepCallback
from sdserve_core.profiles import Profile
from sdserve_core.tasks import Task

PROMPT = "a photograph of an astronaut riding a horse on the moon"
DIRECT = "direct"
SDXL_FULL = "sdxl-random"
TINY_SD = "tiny-sd"
TINY_SDXL = "tiny-sdxl"
COMPILE_CACHE = CACHE.parent / "bench-compile"
# The budget's guess at a model's first torch.compile (seconds, inductor's default mode, cold cache), on the high
# side: until one has been measured it is all the budget knows, and an overrun is what could take the run past 8
# minutes.
COMPILE_GUESS_S = {"sd15": 90.0, "sdxl": 180.0}
# The budget's guess at loading weights (fp32 safetensors from the page cache, cast, copied to the device).
LOAD_BYTES_PER_S = 1.5e9


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmark model: its --models key ("sd15" or "sdxl"), folder and the size it runs at."""

    key: str
    folder: Path
    size: int


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a run measures: device and weights dtype, denoising steps (timed call and warm-up call), batch sizes,
    whether profiles may compile, the time budget and where the first images go (None: nowhere)."""

    device: str
    dtype: torch.dtype
    steps: int
    warmup_steps: int
    batches: tuple[int, ...]
    with_compile: bool
    budget_s: float
    images: Path | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement: a model at a batch size, called directly (profile None) or through sdserve."""

    model: Model
    batch: int
    profile: Profile | None

    @property
    def runner(self) -> str:
        """ "direct" or "sdserve:<profile name>"."""
        return DIRECT if self.profile is None else f"sdserve:{self.profile.name}"

    @property
    def kind(self) -> str:
        """What has to be loaded to run it: the diffusers pipeline or sdserve's Components."""
        return DIRECT if self.profile is None else "sdserve"


@dataclasses.dataclass
class Report:
    """Everything the JSON file holds; `flops` is the UNet's FLOPs per image-step (guided) by model key."""

    machine: dict[str, Any]
    peak_flops: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def setup_for(dry_run: bool, budget_s: float, images: Path | None) -> Setup:
    """CUDA in float16, 20 steps, batches 1 and 8, compile allowed; or the dry run: CPU in float32, 2 steps, batches
    1 and 2, no compile."""
    if dry_run:
        return Setup("cpu", torch.float32, 2, 1, (1, 2), False, budget_s, images)
    return Setup("cuda", torch.float16, 20, 2, (1, 8), True, budget_s, images)


def build_model(key: str, dry_run: bool) -> Model:
    """The model for a --models key, built once into the cache: SD 1.5's full shape at 512 px and SDXL base's full
    shape at 1024 px (random weights), or in the dry run the tiny SD 1.x and SDXL models at 64 px."""
    if dry_run:
        from service.tiny import build_tiny
        from service.tiny_sdxl import build_tiny_sdxl

        if key == "sd15":
            return Model(key, build_tiny(CACHE / TINY_SD, seed=0), 64)
        if key == "sdxl":
            return Model(key, build_tiny_sdxl(CACHE / TINY_SDXL, seed=0), 64)
    elif key == "sd15":
        name, parent = resolve_model("sd15")
        return Model(key, parent / name, 512)
    elif key == "sdxl":
        # SDXL base's own configuration: UNet 320/640/1280 with 1/2/10 transformer layers, VAE 128/256/512/512, and
        # OpenCLIP bigG's text tower with all 32 layers.
        name, parent = sdxl_model(SDXL_FULL, (320, 640, 1280), (1, 2, 10), (128, 256, 512, 512), 32, 1024)
        return Model(key, parent / name, 1024)
    raise ValueError(f"unknown model key {key!r}; expected sd15 or sdxl")


def tier(job: Job, first_batch: int) -> int:
    """Measurement priority: direct and exact (0); compile alone at the first batch size (1), then at the others
    (2: a new batch size compiles again); every other profile (3)."""
    if job.profile is None or job.profile.exact:
        return 0
    if job.profile == Profile(compile=True):
        return 1 if job.batch == first_batch else 2
    return 3


def plan(models: list[Model], setup: Setup) -> list[Job]:
    """Every measurement in the order the budget spends on them: tier by tier over the models, and within a tier
    model by model and runner by runner (so consecutive jobs share what is loaded)."""
    device_type = "cuda" if setup.device == "cuda" else "cpu"
    candidates = profiles.candidates(device_type, setup.dtype, with_compile=setup.with_compile)
    if device_type == "cpu":
        # The CPU dry run checks the plumbing and exact's parity with direct diffusers, the same on every CPU: the
        # CPU's own levers (onnxruntime, bf16 autocast where the CPU has it) are not what the GPU run measures.
        candidates = [p for p in candidates if p.exact]
    runners: list[Profile | None] = [None, *candidates]
    jobs = [Job(model, batch, profile) for model in models for profile in runners for batch in setup.batches]
    return sorted(jobs, key=lambda job: tier(job, setup.batches[0]))


def sync(device: str) -> None:
    """Waits for the device's queued work (CUDA runs ahead of the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


class DeviceSteps(StepCallback):
    """sdserve's StepCallback, waiting for the device before it marks each step's end."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync(self.device)
        return super().__call__(pipe, i, t, kwargs)


class Loaded:
    """The one thing loaded at a time: a model's diffusers pipeline or its sdserve Components."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.key: tuple[str, str] | None = None
        self.value: Any = None

    def holds(self, job: Job) -> bool:
        """Whether `job` runs on what is loaded now."""
        return self.key == (job.model.key, job.kind)

    def get(self, job: Job) -> Any:
        """What `job` runs on, loading it (and dropping anything else) first."""
        if not self.holds(job):
            self.drop()
            self.value = (
                load_direct(job.model, self.setup) if job.profile is None else load_sdserve(job.model, self.setup)
            )
            self.key = (job.model.key, job.kind)
        return self.value

    def drop(self) -> None:
        """Frees what is loaded, with its compiled UNet and the device's cached blocks."""
        unet = getattr(self.value, "unet", None)
        if unet is not None:
            profiles.drop_compiled(unet)
        self.key, self.value, unet = None, None, None
        if self.setup.with_compile:
            torch._dynamo.reset()
        gc.collect()
        if self.setup.device == "cuda":
            torch.cuda.empty_cache()


def load_direct(model: Model, setup: Setup) -> Any:
    """The folder's diffusers pipeline as a user would load it (no safety checker, no SDXL watermark), on the
    device in the run's dtype, with diffusers' default attention (SDPA)."""
    import diffusers

    name = pipeline_class(model.folder)
    extra: dict[str, Any] = {"add_watermarker": False} if name in SDXL_PIPELINES else {"safety_checker": None}
    pipe = getattr(diffusers, name).from_pretrained(
        model.folder, torch_dtype=setup.dtype, use_safetensors=True, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(setup.device)


def load_sdserve(model: Model, setup: Setup) -> Components:
    """The folder's Components as the server loads them (sdserve_core.components.load_components)."""
    variant = "fp16" if setup.dtype == torch.float16 else "fp32"
    return load_components(model.folder, variant, setup.dtype, setup.device)


def scheduler(model: Model) -> Any:
    """A fresh instance of the model's own scheduler, as the server builds one per call."""
    from service import schedulers

    config = json.loads((model.folder / "scheduler" / "scheduler_config.json").read_text())
    return schedulers.build("", config)


def call(job: Job, loaded: Any, steps: int, on_step: StepCallback) -> list[Image.Image]:
    """One pipeline call of `job` (the same prompt for every image; image i's generator is CPU seed i): the
    diffusers pipeline directly, or sdserve_core.pipeline.run with the job's profile."""
    size, batch = job.model.size, job.batch
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    if job.profile is None:
        with torch.inference_mode():
            return list(
                loaded(
                    prompt=[PROMPT] * batch,
                    num_inference_steps=steps,
                    height=size,
                    width=size,
                    generator=generators,
                    output_type="pil",
                    callback_on_step_end=on_step,
                ).images
            )
    pipeline_call = PipelineCall(
        task=Task.GENERATE,
        steps=steps,
        width=size,
        height=size,
        generators=tuple(generators),
        output_type="pil",
        prompt=(PROMPT,) * batch,
        profile=job.profile,
    )
    return list(run(loaded, pipeline_call, scheduler(job.model), on_step))


def move(value: Any, device: str, dtype: torch.dtype) -> Any:
    """`value` (a tensor, or a dict of them) on `device`, floating-point tensors in `dtype`."""
    if isinstance(value, dict):
        return {k: move(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def unet_flops(model: Model, loaded: Any, setup: Setup) -> int:
    """FLOPs of one guided denoising step of one image (the UNet at batch 2) at the model's size."""
    unet = loaded.unet
    inputs = move(unet_inputs(unet, model.size), setup.device, setup.dtype)
    return step_flops(unet, inputs)


def image_name(model: str, batch: int, runner: str) -> str:
    """The PNG file name of a measurement's first image under --images."""
    return f"{model}-b{batch}-{runner.replace(':', '-')}.png"


def pixels_sha256(image: Image.Image) -> str:
    """SHA-256 of an image's raw pixels (equal hashes: equal images)."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def measure(job: Job, loaded: Any, setup: Setup, flops: int, peak: float) -> tuple[dict[str, Any], Image.Image]:
    """Warms the job up with one short call, then times one full call: images/s over the whole call, seconds per
    image-step between the first and the last step's end, peak device memory and the fraction of the matmul peak
    the UNet reached. Returns the result row and the first image."""
    start = time.perf_counter()
    call(job, loaded, setup.warmup_steps, DeviceSteps(setup.device))
    warmup_s = time.perf_counter() - start
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = DeviceSteps(setup.device)
    start = time.perf_counter()
    images = call(job, loaded, setup.steps, clock)
    sync(setup.device)
    call_s = time.perf_counter() - start
    per_image_step = clock.seconds_per_step() / job.batch
    row = {
        "model": job.model.key,
        "model_name": job.model.folder.name,
        "size": job.model.size,
        "batch": job.batch,
        "runner": job.runner,
        "compile": bool(job.profile and job.profile.compile),
        "steps": setup.steps,
        "images_per_s": job.batch / call_s,
        "seconds_per_image_step": per_image_step,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if setup.device == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if setup.device == "cuda" else None,
        "fraction_of_peak": flops / per_image_step / peak,
        "warmup_seconds": warmup_s,
        "call_seconds": call_s,
        "first_image_sha256": pixels_sha256(images[0]),
    }
    return row, images[0]


def estimate(job: Job, report: Report, loaded: Loaded, setup: Setup) -> float:
    """Seconds `job` should take (load, warm-up call, compile, timed call), from what was measured so far: the
    fastest uncompiled call of the model (scaled by batch), the slowest compile of the model or COMPILE_GUESS_S."""
    rows = [r for r in report.results if r["model"] == job.model.key]
    per_image = [r["call_seconds"] / r["batch"] for r in rows if not r["compile"]]
    call_s = min(per_image, default=0.0) * job.batch
    seconds = call_s * (1.0 + max(0.25, setup.warmup_steps / setup.steps))
    if job.profile is not None and job.profile.compile:
        compiles = [r["warmup_seconds"] for r in rows if r["compile"]]
        seconds += max(compiles, default=COMPILE_GUESS_S.get(job.model.key, 60.0))
    if not loaded.holds(job):
        weights = sum(p.stat().st_size for p in job.model.folder.rglob("*.safetensors"))
        seconds += weights / LOAD_BYTES_PER_S
    return seconds


def skip(job: Job, reason: str) -> dict[str, Any]:
    """A `skipped` entry."""
    return {"model": job.model.key, "size": job.model.size, "batch": job.batch, "runner": job.runner, "reason": reason}


def run_job(job: Job, report: Report, loaded: Loaded, setup: Setup) -> None:
    """Loads what `job` needs, counts the model's FLOPs once, measures the job and adds its row (with whether its
    first image equals the direct call's) and first image."""
    value = loaded.get(job)
    info = report.models.setdefault(job.model.key, {"name": job.model.folder.name, "size": job.model.size})
    if "flops_per_image_step" not in info:
        info["flops_per_image_step"] = unet_flops(job.model, value, setup)
        info["unet_parameters"] = sum(p.numel() for p in value.unet.parameters())
    row, image = measure(job, value, setup, info["flops_per_image_step"], report.peak_flops["flops"])
    direct = [r for r in report.results if r["model"] == job.model.key and r["batch"] == job.batch]
    direct = [r for r in direct if r["runner"] == DIRECT]
    if job.profile is not None and direct:
        row["same_pixels_as_direct"] = row["first_image_sha256"] == direct[0]["first_image_sha256"]
    report.results.append(row)
    if setup.images is not None:
        setup.images.mkdir(parents=True, exist_ok=True)
        image.save(setup.images / image_name(job.model.key, job.batch, job.runner))


def run_plan(jobs: list[Job], report: Report, setup: Setup, started: float, out: Path) -> None:
    """Runs the jobs in order, skipping any whose estimate would take the run past the budget. Writes `out` after
    each job, so a run stopped from outside keeps what it measured."""
    loaded = Loaded(setup)
    for job in jobs:
        elapsed = time.perf_counter() - started
        needed = estimate(job, report, loaded, setup)
        if elapsed + needed > setup.budget_s:
            reason = f"time budget: {elapsed:.0f} s spent, about {needed:.0f} s needed, {setup.budget_s:.0f} s budget"
            report.skipped.append(skip(job, reason))
        else:
            attempt(job, report, loaded, setup)
        write(report, out, time.perf_counter() - started, complete=False)
    loaded.drop()


def attempt(job: Job, report: Report, loaded: Loaded, setup: Setup) -> None:
    """Runs one job. On CUDA a failure (out of memory, a compile error) is recorded as skipped, what was loaded is
    dropped, and the run goes on; the CPU dry run raises it."""
    failed = ""
    try:
        run_job(job, report, loaded, setup)
    except Exception as exc:
        if setup.device != "cuda":
            raise
        failed = "".join(traceback.format_exception_only(exc)).strip()[-500:]
    if failed:
        # Out of the except block: the traceback's frames no longer hold the call's tensors.
        report.skipped.append(skip(job, f"error: {failed}"))
        loaded.drop()


def describe_machine(setup: Setup) -> dict[str, Any]:
    """bench.machine's description, with the GPU's name and memory and the CUDA and cuDNN versions."""
    info = machine.describe(torch.get_num_threads())
    cuda = setup.device == "cuda"
    props = torch.cuda.get_device_properties(0) if cuda else None
    info.update(
        gpu=props.name if props else None,
        gpu_memory_bytes=props.total_memory if props else None,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if cuda else None,  # type: ignore[no-untyped-call]
    )
    return info


def measure_peak(setup: Setup) -> dict[str, Any]:
    """The measured matmul peak the fractions are against: float16 on CUDA (8192-square), float32 on the CPU."""
    if setup.device == "cuda":
        return {"dtype": "float16", "device": "cuda", "flops": matmul_peak(torch.float16, "cuda", largest=8192)}
    return {"dtype": "float32", "device": "cpu", "flops": matmul_peak(torch.float32, "cpu", seconds=0.5)}


def write(report: Report, out: Path, elapsed: float, complete: bool) -> None:
    """Writes the report to `out` (atomically), with the run's elapsed seconds and whether it finished."""
    data = dataclasses.asdict(report)
    data["settings"] = {**report.settings, "elapsed_seconds": round(elapsed, 1), "complete": complete}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(out)


def table(report: Report) -> str:
    """The results as a Markdown table, with each runner's images/s against direct's at the same model and batch."""
    lines = [
        "| model | size | batch | runner | images/s | vs direct | ms per image-step | peak GiB | of PEAK peak "
        "| warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        same = [d for d in report.results if (d["model"], d["batch"], d["runner"]) == (r["model"], r["batch"], DIRECT)]
        ratio = f"{r['images_per_s'] / same[0]['images_per_s']:.2f}x" if same else ""
        memory = "" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['runner']} | {r['images_per_s']:.3f} | {ratio} | "
            f"{r['seconds_per_image_step'] * 1000:.2f} | {memory} | {r['fraction_of_peak']:.1%} | "
            f"{r['warmup_seconds']:.1f} |"
        )
    lines += [f"skipped: {s['model']} batch {s['batch']} {s['runner']}: {s['reason']}" for s in report.skipped]
    return "\n".join(lines).replace("PEAK", report.peak_flops["dtype"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument("--models", default="sd15,sdxl", help="Comma-separated: sd15, sdxl (default both).")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="Start no measurement past this.")
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, tiny models, 2 steps, batches 1, 2.")
    parser.add_argument("--images", type=Path, default=None, help="Write each measurement's first image here.")
    return parser.parse_args(argv)


def quiet() -> None:
    """No progress bars, and diffusers' and transformers' warnings off (deprecations, unused safety checker)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    """Builds the models, measures the matmul peak, runs the plan within the budget, writes the JSON, prints."""
    started = time.perf_counter()
    ns = parse_args(argv)
    quiet()
    if not ns.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA device; use --dry-run to check it on the CPU")
    setup = setup_for(ns.dry_run, ns.budget_seconds, ns.images)
    if setup.with_compile:
        profiles.use_compile_cache(COMPILE_CACHE)
    models = [build_model(key, ns.dry_run) for key in ns.models.split(",") if key]
    settings = {
        "dry_run": ns.dry_run,
        "device": setup.device,
        "dtype": str(setup.dtype).removeprefix("torch."),
        "steps": setup.steps,
        "warmup_steps": setup.warmup_steps,
        "batches": list(setup.batches),
        "budget_seconds": setup.budget_s,
        "prompt": PROMPT,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    report = Report(describe_machine(setup), measure_peak(setup), settings)
    run_plan(plan(models, setup), report, setup, started, ns.out)
    write(report, ns.out, time.perf_counter() - started, complete=True)
    print(f"matmul peak: {report.peak_flops['flops'] / 1e12:.2f} TFLOP/s ({report.peak_flops['dtype']})")
    print(table(report))
    print(f"wrote {ns.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
