"""Command line: `python -m training.shapes [stage] --out models --budget-minutes N`; stages and their outputs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import card
from .adapter_stage import ADAPTERS_DIR, train_adapters
from .adapters import BATCH as ADAPTER_BATCH
from .adapters import (
    INVERT_MORE_STEPS,
    LORA_STEPS,
    N_SCENES,
    REFINE_MORE_ROUNDS,
    REFINE_MORE_STEPS,
    REFINE_STEPS,
    TI_COMPARE_STEPS,
    TI_REFINE_STEPS,
    TI_STEPS,
    AdapterRun,
)
from .decoder import train_decoder
from .export import INPAINT_NAME, T2I_NAME, export, t2i_dir, terminal_dir, vae_dir
from .inpaint import train_inpaint
from .loop import PRECISIONS, UNetStage, resolve_precision
from .palette import N_SCENES as PALETTE_SCENES
from .palette import STEPS as PALETTE_STEPS
from .palette import widen_family
from .reflow import train_reflow
from .sample_eval import run_eval
from .tokenizer import build_tokenizer
from .unet import train_terminal, train_unet
from .vae import train_vae

log = logging.getLogger("training.shapes")
STAGES = ("tokenizer", "vae", "unet", "terminal", "inpaint", "decoder", "reflow", "export", "palette", "eval", "card")
# The recipe: each stage's training minutes, as the shipped family was trained (their sum, 115, is
# `--budget-minutes 115`; another budget scales them all). Stage 2b's 26.4 minutes are about 3,900 steps of batch
# 32 in bf16 on the 2-core machine (see the model card for the runs). Training time only: rendering and caching
# (about 2.5 minutes), the reflow stage's sampling (about 6), export and eval (about 1.5) come on top, so the
# default budget is 109 minutes, which keeps a whole run from scratch on the 2-core machine within two hours. The
# palette stage (palette.py: a fixed step count, about 16 minutes with its rendering and inversion) comes on top.
MINUTES = {"vae": 12.1, "unet": 45.1, "terminal": 26.4, "inpaint": 14.3, "decoder": 12.1, "reflow": 5.0}
RECIPE_BUDGET = round(sum(MINUTES.values()), 1)
DEFAULT_BUDGET = 109.0
SHARES = {stage: minutes / RECIPE_BUDGET for stage, minutes in MINUTES.items()}
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m training.shapes", description=__doc__)
    p.add_argument("stage", nargs="?", default="all", choices=("all", "selfcheck", *STAGES, "adapters"))
    p.add_argument("--out", type=Path, default=Path("models"), help="where the model folders go")
    p.add_argument("--work", type=Path, default=Path("/tmp/shapes-work"), help="stage checkpoints and caches")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=DEFAULT_BUDGET,
        help="training time of all stages together, split in proportion to MINUTES (default 109: a whole run fits "
        "in two hours on the 2-core machine; the shipped family was trained with the recipe's 115)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="UNet stages' compute: bf16 autocast (fp32 weights, optimiser and loss; 1.4x the steps per minute on "
        "the 2-core reference CPU, which the shipped family was trained with), fp32, or auto (the default) = bf16 "
        "where the CPU or GPU computes it natively, else fp32 (emulated bf16 is slower than fp32)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="batch size of the UNet stages (2, 2b, inpaint); the time budgets stay, so a smaller batch takes more "
        "steps (the shipped family: 32, which drew 17 squares in 32 before stage 2c; full retrains at 64, 24 and 16 "
        "drew 1, 3 and 0; see the model card)",
    )
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    for stage in SHARES:
        p.add_argument(
            f"--{stage}-minutes", type=float, help=f"{stage} training time (default: its share of the budget)"
        )
        p.add_argument(f"--{stage}-steps", type=int, help="a fixed step count instead of a time budget")
    p.add_argument("--palette-steps", type=int, default=PALETTE_STEPS, help="palette: decoder fine-tuning steps")
    p.add_argument(
        "--palette-scenes", type=int, default=PALETTE_SCENES, help="palette: rendered scenes per set (base; new colour)"
    )
    p.add_argument("--model", type=Path, help="palette, eval: text-to-image folder (default OUT/shapes)")
    p.add_argument(
        "--inpaint-model", type=Path, help="eval: inpainting folder (default: the sibling sdserve.json names)"
    )
    p.add_argument("--steps", type=int, default=20, help="eval: sampling steps")
    p.add_argument("--n", type=int, default=96, help="eval: prompts in the grid")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    _adapter_args(p)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    for name in ("palette_steps", "palette_scenes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def _adapter_args(p: argparse.ArgumentParser) -> None:
    """The `adapters` stage's options (its eval uses --n and --steps, its base model --model)."""
    p.add_argument("--lora-steps", type=int, default=LORA_STEPS, help="adapters: LoRA training steps")
    p.add_argument("--refine-steps", type=int, default=REFINE_STEPS, help="adapters: LoRA refining steps (0: none)")
    p.add_argument(
        "--refine-more-rounds",
        type=int,
        default=REFINE_MORE_ROUNDS,
        help="adapters: the LoRA's later refining rounds (base images weighed more; 0: none)",
    )
    p.add_argument(
        "--refine-more-steps", type=int, default=REFINE_MORE_STEPS, help="adapters: steps of each later round"
    )
    p.add_argument(
        "--invert-more-steps",
        type=int,
        default=INVERT_MORE_STEPS,
        help="adapters: more inversion steps for LoRA scenes that decode wrong; those still wrong left out (0: none)",
    )
    p.add_argument("--ti-steps", type=int, default=TI_STEPS, help="adapters: textual-inversion training steps")
    p.add_argument(
        "--ti-refine-steps", type=int, default=TI_REFINE_STEPS, help="adapters: embedding refining steps (0: none)"
    )
    p.add_argument("--ti-compare-steps", type=int, default=TI_COMPARE_STEPS, help="adapters: TI candidates' steps")
    p.add_argument("--adapter-batch", type=int, default=ADAPTER_BATCH, help="adapters: batch size")
    p.add_argument("--adapter-scenes", type=int, default=N_SCENES, help="adapters: rendered scenes per data set")


class Run:
    """One invocation: paths, the shared report file and per-stage logging."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work
        self.work.mkdir(parents=True, exist_ok=True)
        args.log_dir.mkdir(parents=True, exist_ok=True)
        self.report_path = self.work / "report.json"
        self.report: dict[str, Any] = json.loads(self.report_path.read_text()) if self.report_path.exists() else {}

    def save(self, key: str, value: Any) -> None:
        """Record a stage's figures in the report."""
        self.report[key] = value
        self.report_path.write_text(json.dumps(self.report, indent=2) + "\n")

    def budget(self, stage: str) -> float:
        """Seconds of training time for the stage."""
        minutes = getattr(self.args, f"{stage}_minutes")
        return 60 * (minutes if minutes is not None else float(self.args.budget_minutes) * SHARES[stage])

    def stage(self, name: str, done: bool, fn: Callable[[], Any]) -> None:
        """Run one stage with its own log file, unless its output exists (and not --force)."""
        if done and not self.args.force:
            log.info("stage=%s skipped (output exists; --force reruns it)", name)
            return
        handler = logging.FileHandler(self.args.log_dir / f"shapes-train-{name}.log", mode="w")
        handler.setFormatter(logging.Formatter(_FORMAT))
        logging.getLogger().addHandler(handler)
        start = time.monotonic()
        log.info("stage=%s start", name)
        try:
            figures = fn()
            wall = time.monotonic() - start
            log.info("stage=%s done wall=%.0fs figures=%s", name, wall, figures)
            if figures is not None:
                self.save(name, {**figures, "wall_seconds": wall} if isinstance(figures, dict) else figures)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def main(argv: list[str]) -> int:
    """Run the chosen stage, or all of them in order."""
    logging.basicConfig(level=logging.INFO, format=_FORMAT, stream=sys.stdout)
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = Run(args)
    w, out, seed = run.work, args.out, args.seed
    t2i_model: Path = args.model or out / T2I_NAME
    wanted = STAGES if args.stage == "all" else (args.stage,)
    if args.stage == "adapters":
        return _adapters(run, t2i_model)
    if args.stage == "selfcheck":
        from .evaluate import ground_truth_accuracy

        acc = ground_truth_accuracy(args.n, seed)
        log.info("scorer on ground-truth renders: %s", acc)
        return 0 if min(acc.values()) == 1.0 else 1
    if args.stage == "all":
        run.save("command", "python -m training.shapes " + shlex.join(argv))
        run.save("machine", _machine())
    steps = {stage: getattr(args, f"{stage}_steps") for stage in SHARES}
    precision = resolve_precision(args.precision)

    def unet_stage(name: str) -> UNetStage:
        return UNetStage(w / "vae", w / "tokenizer", run.budget(name), seed, steps[name], precision, args.batch)

    stages: dict[str, tuple[bool, Callable[[], Any]]] = {
        "tokenizer": ((w / "tokenizer" / "tokenizer.json").exists(), lambda: build_tokenizer(w / "tokenizer") and None),
        "vae": (
            _weights(w / "vae"),
            lambda: _train_vae(w, run.budget("vae"), seed, steps["vae"]),
        ),
        "unet": (_weights(w / "t2i" / "unet"), lambda: train_unet(unet_stage("unet"), w / "t2i")),
        "terminal": (
            _weights(w / "t2i-terminal" / "unet"),
            lambda: train_terminal(unet_stage("terminal"), w / "t2i", w / "t2i-terminal"),
        ),
        "inpaint": (
            _weights(w / "inpaint" / "unet"),
            lambda: train_inpaint(unet_stage("inpaint"), terminal_dir(w), w / "inpaint"),
        ),
        "decoder": (
            _weights(w / "vae-tuned"),
            lambda: train_decoder(
                w / "vae", w / "tokenizer", w, w / "vae-tuned", run.budget("decoder"), seed, steps["decoder"]
            ),
        ),
        "reflow": (
            _weights(w / "t2i-reflow" / "unet"),
            lambda: train_reflow(unet_stage("reflow"), terminal_dir(w), vae_dir(w), w / "t2i-reflow"),
        ),
        "export": (
            (out / T2I_NAME / "sdserve.json").exists() and (out / INPAINT_NAME / "sdserve.json").exists(),
            lambda: export(w, out, seed),
        ),
        "palette": (
            args.stage == "all" and "palette" in run.report,
            lambda: widen_family(
                t2i_model,
                args.inpaint_model or _sibling_inpaint(t2i_model),
                seed,
                args.palette_steps,
                args.palette_scenes,
            ),
        ),
        "eval": (
            args.stage == "all" and "eval" in run.report,
            lambda: run_eval(
                t2i_model,
                args.inpaint_model or _sibling_inpaint(t2i_model),
                args.steps,
                args.n,
                sheets=w / "eval",
                reference_unet=t2i_dir(w) / "unet" if _weights(t2i_dir(w) / "unet") else None,
            ),
        ),
        "card": (False, lambda: card.write_cards(out, run.report)),
    }
    for name in wanted:
        done, fn = stages[name]
        run.stage(name, done, fn)
    return 0


def _adapters(run: Run, model: Path) -> int:
    """Stage `adapters` (not part of "all"): the LoRA and the textual-inversion embedding for the shipped
    text-to-image model, into OUT/adapters/ (see training/shapes/adapters.py)."""
    a = run.args
    spec = AdapterRun(
        model,
        a.seed,
        a.lora_steps,
        a.ti_steps,
        a.adapter_batch,
        a.adapter_scenes,
        a.ti_compare_steps,
        a.refine_steps,
        a.ti_refine_steps,
        a.refine_more_rounds,
        a.refine_more_steps,
        a.invert_more_steps,
    )
    out = a.out / ADAPTERS_DIR
    run.stage("adapters", False, lambda: train_adapters(spec, out, a.n, a.steps, run.work / "adapters-report.json"))
    return 0


def _train_vae(work: Path, seconds: float, seed: int, steps: int | None) -> dict[str, float]:
    """Train the VAE, first dropping the latent caches, which belong to the previous VAE."""
    for cache in work.glob("*-latents.pt"):
        cache.unlink()
    return train_vae(work / "vae", seconds, seed, steps)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def _sibling_inpaint(model: Path) -> Path | None:
    meta = model / "sdserve.json"
    if not meta.exists():
        return None
    name = json.loads(meta.read_text()).get("inpaint_model")
    return model.parent / name if name else None
