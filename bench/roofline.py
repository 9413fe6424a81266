"""How close the UNet runs to the machine's limit: the measured matmul peak (a large fp32 and bf16 `torch.mm`), the
UNet's FLOPs per denoising step (torch's FlopCounterMode, classifier-free guidance's batch of 2 included) and its
measured step time under each execution lever (fp32; channels_last; bf16 autocast; optionally torch.compile).

    python -m bench.roofline                      # tiny and small, about 3 minutes on 2 cores
    python -m bench.roofline --models small --compile --out bench/results/roofline.json

Writes a JSON file and prints a table: per model and lever, ms per step, achieved GFLOP/s and the fraction of the
machine's matmul peak (the faster of fp32 and bf16)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.models import resolve_model


def matmul_peak(dtype: torch.dtype, device: str = "cpu", largest: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul in `dtype`: the best of repeated timings over about `seconds`, at the largest size
    up to `largest` whose one call takes under a quarter of that (a dtype the CPU has no instructions for, such as
    bf16 without AVX512-BF16 or AMX, is hundreds of times slower and is measured on a smaller matrix)."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if n >= largest or time.perf_counter() - start > seconds / 4:
            break
        n *= 2
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def unet_inputs(unet: Any, size: int, batch: int = 2) -> dict[str, Any]:
    """Inputs of one guided denoising step at `size` pixels (batch 2: the conditional and unconditional halves)."""
    cfg = unet.config
    latent = size // 8
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, latent, latent),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
    return inputs


def step_flops(unet: Any, inputs: dict[str, Any]) -> int:
    """FLOPs of one UNet call, counted by torch (matmuls and convolutions)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return int(counter.get_total_flops())


def timed(call: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `call` after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def levers(unet: Any, inputs: dict[str, Any], repeats: int, compile_unet: bool) -> dict[str, tuple[float, str]]:
    """Seconds per step under each lever, with the dtype whose peak it is measured against."""

    def run(module: Any, **extra: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return module(**inputs, **extra).sample

        return call

    out = {"fp32": (timed(run(unet), repeats), "fp32")}

    def bf16() -> Any:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(**inputs).sample

    out["bf16 autocast"] = (timed(bf16, max(1, repeats // 3)), "bf16")
    channels_last = unet.to(memory_format=torch.channels_last)
    inputs_cl = dict(inputs, sample=inputs["sample"].to(memory_format=torch.channels_last))
    out["channels_last"] = (timed(lambda: channels_last(**inputs_cl).sample, repeats), "fp32")
    unet.to(memory_format=torch.contiguous_format)
    if compile_unet:
        start = time.perf_counter()
        compiled = torch.compile(unet)
        run(compiled)()
        label = f"torch.compile (compiled in {time.perf_counter() - start:.0f} s)"
        out[label] = (timed(run(compiled), repeats), "fp32")
    return out


def measure(key: str, size: int | None, repeats: int, compile_unet: bool) -> dict[str, Any]:
    """One model's FLOPs per step and its levers' step times and fractions of the matmul peaks."""
    from diffusers import UNet2DConditionModel

    name, parent = resolve_model(key)
    folder = parent / name
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    info = json.loads((folder / "sdserve.json").read_text()) if (folder / "sdserve.json").is_file() else {}
    pixels = size or int(info.get("default_width", 8 * unet.config.sample_size))
    inputs = unet_inputs(unet, pixels)
    flops = step_flops(unet, inputs)
    timings = levers(unet, inputs, repeats, compile_unet)
    return {"model": name, "size": pixels, "flops_per_step": flops, "levers": timings}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,small", help="Comma-separated: tiny, small, sd15, sdxl.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the bench).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per lever (bf16 autocast: a third).")
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile (minutes to compile).")
    parser.add_argument("--out", default="bench/results/roofline.json", help="JSON file to write.")
    ns = parser.parse_args(argv)
    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    models = [measure(m, None, ns.repeats, ns.compile) for m in ns.models.split(",") if m]
    report = {"threads": ns.threads, "matmul_peak_flops": peaks, "models": models}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=2))
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    # The limit is the fastest matmul this machine has, whichever dtype gives it.
    limit = max(peaks.values())
    print("| model | size | GFLOP per step | lever | ms per step | achieved GFLOP/s | fraction of the matmul peak |")
    print("|---|---|---|---|---|---|---|")
    for m in models:
        for lever, (seconds, _dtype) in m["levers"].items():
            achieved = m["flops_per_step"] / seconds
            print(
                f"| {m['model']} | {m['size']} | {m['flops_per_step'] / 1e9:.2f} | {lever} | {seconds * 1000:.0f} | "
                f"{achieved / 1e9:.1f} | {achieved / limit:.1%} |"
            )


if __name__ == "__main__":
    main()
