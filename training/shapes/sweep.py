"""Recipe sweep: text-to-image UNet variants trained side by side, one process each, and scored on the grid.

    python -m training.shapes.sweep --out DIR [--only NAME,NAME] [--device cuda] [--scale 0.002 --n 16]

Made for one GPU, where every variant of VARIANTS finishes in minutes (on an H100, 9 at once with CUDA MPS:
7 minutes); on this 2-core CPU one variant takes as long as its stages do in `python -m training.shapes`.
Each variant runs `unet.fit`, the loop of the shipped stages, at step counts that match this CPU's budget
(stage 2 45 min = 2,609 steps of the base UNet; stage 2b about 1,650), so the figures say what a CPU run of
that recipe would reach. Variants named `*_cpu_s2_*` and `D*` start from an existing stage-2 folder
(`--stage2`) instead of training stage 2. Writes DIR/results.json and one contact sheet per variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import evaluate
from .configs import inference_scheduler, new_text_encoder, new_unet, sd_scheduler, train_scheduler
from .data import render_dataset
from .grammar import prompt_text
from .loop import Budget, Progress, seed_everything
from .sample_eval import contact_sheet, text_to_image
from .tensors import encode_moments, to_tensor
from .text import token_ids
from .unet import N_LATENTS, STAGE2, TERMINAL, Recipe, fit, load_text_to_image

log = logging.getLogger("training.shapes.sweep")
_FORMAT = "%(asctime)s %(name)s: %(message)s"

# Architecture variants: UNet2DConditionModel arguments over configs.new_unet, and their CPU cost per
# training step relative to the base UNet (batch 64, fwd + bwd + AdamW, 2 cores).
ARCHS: dict[str, tuple[dict[str, Any], float]] = {
    "base": ({}, 1.0),
    "pooled": ({"addition_embed_type": "text", "addition_embed_type_num_heads": 4}, 1.0),
    "xattn16": (
        {"down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2},
        1.55,
    ),
    "deep": ({"layers_per_block": 2}, 1.42),
}


@dataclass(frozen=True)
class Variant:
    arch: str = "base"
    stage2_steps: int | None = None  # None: start from --stage2
    terminal_steps: int = 1650
    terminal: Recipe = field(default=TERMINAL)


def _cpu_budget(arch: str, stage2: int = 2609, terminal: int = 1650) -> Variant:
    cost = ARCHS[arch][1]
    return Variant(arch, round(stage2 / cost), round(terminal / cost))


VARIANTS: dict[str, Variant] = {
    "A1_cpu_s2_2b823": Variant(terminal_steps=823, terminal=replace(TERMINAL, high_until=1.0)),
    "A2_cpu_s2_2b1650": Variant(),
    "A3_cpu_s2_2b1650u": Variant(terminal=replace(TERMINAL, p_high=0.0)),
    "B1_base": _cpu_budget("base"),
    "B2_pooled": _cpu_budget("pooled"),
    "B3_xattn16": _cpu_budget("xattn16"),
    "B4_deep": _cpu_budget("deep"),
    "C1_base_long": Variant("base", 6000, 2000),
    "C2_pooled_long": Variant("pooled", 6000, 2000),
    "D1_mid_t": Variant(terminal=replace(TERMINAL, p_mid=0.4)),
    "D2_te_lr3": Variant(terminal=replace(TERMINAL, text_lr_mult=3.0)),
    "D3_lr6e-4": Variant(terminal=replace(TERMINAL, lr=6e-4)),
    "D4_ema995": Variant(terminal=replace(TERMINAL, ema_decay=0.995)),
}


@dataclass(frozen=True)
class Settings:
    out: Path
    models: Path
    stage2: Path
    device: str
    scale: float
    n: int
    n_latents: int


def build_cache(s: Settings) -> None:
    """Render and encode the training scenes once (the stages' cache seed), for every variant."""
    vae = AutoencoderKL.from_pretrained(str(s.models / "shapes" / "vae")).eval().to(s.device)
    tokenizer = CLIPTokenizer.from_pretrained(str(s.models / "shapes" / "tokenizer"))
    images, scenes = render_dataset(1, s.n_latents)
    mean, _ = encode_moments(vae, to_tensor(images).to(s.device))
    ids = token_ids(tokenizer, [prompt_text(sc.attrs) for sc in scenes])
    scaled = mean.cpu() * float(vae.config.scaling_factor)
    torch.save({"latents": scaled, "ids": ids, "empty": token_ids(tokenizer, [""])[0]}, s.out / "cache.pt")


@torch.no_grad()
def score(s: Settings, name: str, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> dict[str, Any]:
    """Grid accuracy at guidance 7.5, 3 and 1, with per-shape counts; a contact sheet at 7.5."""
    unet.eval()
    text_encoder.eval()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(s.models / "shapes" / "vae")),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(s.models / "shapes" / "tokenizer")),
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(s.device)
    pipe.set_progress_bar_config(disable=True)
    grid = evaluate.prompt_grid(s.n)
    out: dict[str, Any] = {}
    for guidance in (7.5, 3.0, 1.0):
        images = text_to_image(pipe, s.n, 20, guidance)
        scores = [evaluate.score(evaluate.judge(im), g.attrs) for im, g in zip(images, grid, strict=True)]
        acc: dict[str, Any] = dict(evaluate.accuracy(scores))
        for shape in ("circle", "square", "triangle"):
            right = [sc["shape"] for sc, g in zip(scores, grid, strict=True) if g.attrs.shape == shape]
            acc[f"shape_{shape}"] = f"{sum(right)}/{len(right)}"
        out[f"guidance_{guidance:g}"] = acc
        if guidance == 7.5:
            contact_sheet(images, s.out / f"sheet-{name}.png")
    return out


def _steps(s: Settings, steps: int) -> int:
    return max(2, round(steps * s.scale))


def run_variant(s: Settings, name: str) -> None:
    """Train and score one variant; its figures go to OUT/result-NAME.json (an error too)."""
    logging.basicConfig(level=logging.INFO, format=_FORMAT)
    torch.set_num_threads(1)
    v = VARIANTS[name]
    result: dict[str, Any] = {"variant": repr(v)}
    try:
        cache = torch.load(s.out / "cache.pt")
        if v.stage2_steps is None:
            unet, text_encoder = load_text_to_image(s.stage2)
        else:
            seed_everything(0)
            tokenizer = CLIPTokenizer.from_pretrained(str(s.models / "shapes" / "tokenizer"))
            text_encoder, unet = new_text_encoder(tokenizer), new_unet(**ARCHS[v.arch][0])
            steps = _steps(s, v.stage2_steps)
            result["stage2"] = _fit(s, unet, text_encoder, cache, sd_scheduler(), STAGE2, steps, 0, name)
        steps = _steps(s, v.terminal_steps)
        result["terminal"] = _fit(s, unet, text_encoder, cache, train_scheduler(), v.terminal, steps, 7, name)
        result["eval"] = score(s, name, unet, text_encoder)
        log.info("variant=%s %s", name, json.dumps(result["eval"]["guidance_7.5"]))
    except Exception:
        result["error"] = traceback.format_exc()
        log.error("variant=%s failed: %s", name, result["error"])
    (s.out / f"result-{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def _fit(
    s: Settings,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    cache: dict[str, torch.Tensor],
    scheduler: Any,
    recipe: Recipe,
    steps: int,
    seed: int,
    name: str,
) -> dict[str, float | str]:
    budget = Budget(0.0, recipe.warmup, steps)
    latents, ids, empty = cache["latents"], cache["ids"], cache["empty"]
    return fit(unet, text_encoder, latents, ids, empty, scheduler, recipe, budget, Progress(name), seed, s.device)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=_FORMAT)
    p = argparse.ArgumentParser(prog="python -m training.shapes.sweep", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--models", type=Path, default=Path("models"), help="VAE and tokenizer from MODELS/shapes")
    p.add_argument("--stage2", type=Path, default=Path("/tmp/shapes-work/t2i"), help="stage-2 output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (a dry run: 0.002)")
    p.add_argument("--n", type=int, default=96, help="grid prompts to score")
    p.add_argument("--n-latents", type=int, default=N_LATENTS)
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"--only: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    s = Settings(a.out, a.models, a.stage2, a.device, a.scale, a.n, a.n_latents)
    s.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    build_cache(s)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=run_variant, args=(s, n)) for n in names]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    results = {}
    for n in names:
        f = s.out / f"result-{n}.json"
        results[n] = json.loads(f.read_text()) if f.exists() else {"error": "the process left no result"}
    (s.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log.info("done in %.0f s: %s", time.monotonic() - start, s.out / "results.json")
    return 0 if all("eval" in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
