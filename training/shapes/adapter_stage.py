"""The `adapters` stage: train both adapters, write their folders (weights, manifest, card) and measure them."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .adapter_card import write_cards, write_manifests
from .adapter_eval import default_guidance, measure_lora, measure_ti
from .adapters import (
    LORA_NAME,
    TI_NAME,
    AdapterRun,
    load_base,
    lora_scenes,
    save_lora,
    save_ti,
    train_lora,
    train_ti,
)
from .grammar import TI_CANDIDATES, TI_COLOUR
from .refine import BASE_WEIGHT, MORE_BASE_WEIGHT, refine_lora, refine_ti

log = logging.getLogger(__name__)
ADAPTERS_DIR = "adapters"


def train_adapters(run: AdapterRun, out: Path, n: int, steps: int, report_path: Path | None = None) -> dict[str, Any]:
    """Compare textual-inversion candidates (TI_CANDIDATES), train and refine the shipped embedding (TI_COLOUR)
    and the LoRA into out/<name>/, measure them on n-prompt grids (steps sampling steps; n = 0 skips the
    measurements) and write the manifests and cards; return the figures."""
    report: dict[str, Any] = {"ti_candidates": compare_ti(run, n, steps)}
    vectors, ti = train_ti(run, TI_COLOUR)
    if run.ti_refine_steps:
        guidance, batch = default_guidance(run.model), max(1, run.batch // 4)
        vectors, refined = refine_ti(run.model, vectors, TI_COLOUR, run.ti_refine_steps, batch, guidance, run.seed)
        ti |= refined
    save_ti(vectors, out / TI_NAME)
    report["ti"] = {**ti, "batch": run.batch}
    report["lora"] = {**make_lora(run, out / LORA_NAME), "batch": run.batch}
    gc.collect()
    return publish(run.model, out, report, n, steps, report_path)


def make_lora(run: AdapterRun, folder: Path) -> dict[str, Any]:
    """Train the LoRA, refine it (run.refine_steps, then run.refine_more_rounds rounds of run.refine_more_steps
    with the base images weighed refine.MORE_BASE_WEIGHT) and save it into folder; return the figures (a later
    round's as refine_more_<n>_*)."""
    base = load_base(run.model)
    new, old = lora_scenes(base, run)
    lora: dict[str, Any] = train_lora(run, base, new, old)
    rounds = [(run.refine_steps, run.seed, BASE_WEIGHT, "refine_")] if run.refine_steps else []
    more = range(1, run.refine_more_rounds + 1)
    rounds += [(run.refine_more_steps, run.seed + r, MORE_BASE_WEIGHT, f"refine_more_{r}_") for r in more]
    guidance, batch = default_guidance(run.model), max(1, run.batch // 4)
    for refine_steps, seed, weight, prefix in rounds:
        figures = refine_lora(run.model, base, new, old, refine_steps, batch, guidance, seed, weight)
        lora |= {k.replace("refine_", prefix, 1): v for k, v in figures.items()}
    save_lora(base, folder)
    return lora


def compare_ti(run: AdapterRun, n: int, steps: int) -> dict[str, Any]:
    """Train an embedding for each candidate colour (run.ti_compare_steps steps each) and measure each (n > 0);
    return {colour: {"train": figures, "eval": figures}}. TI_COLOUR is the one that scored best."""
    figures: dict[str, Any] = {}
    short = replace(run, ti_steps=run.ti_compare_steps)
    with tempfile.TemporaryDirectory() as tmp:
        for colour in TI_CANDIDATES:
            vectors, trained = train_ti(short, colour)
            save_ti(vectors, Path(tmp) / colour, f"<{colour}>")
            figures[colour] = {"train": trained}
            if n > 0:
                figures[colour]["eval"] = measure_ti(run.model, Path(tmp) / colour, n, steps, colour)
                log.info("stage=adapters ti=%s figures=%s", colour, figures[colour]["eval"])
    return figures


def publish(
    model: Path, out: Path, report: dict[str, Any], n: int, steps: int, report_path: Path | None
) -> dict[str, Any]:
    """Given both adapter files in out/<name>/ and the training figures in report: write the manifests, measure
    them (n = 0: skip; a fresh grid of 2n prompts beside the n-prompt tuning grids, adapter_eval), write the cards
    and the report (report_path); return the report."""
    report["manifests"] = write_manifests(out)
    if n > 0:
        report["lora_eval"] = measure_lora(model, out / LORA_NAME, n, steps, fresh_n=2 * n)
        log.info("stage=adapters lora figures=%s", report["lora_eval"])
        report["ti_eval"] = measure_ti(model, out / TI_NAME, n, steps, fresh_n=2 * n)
        log.info("stage=adapters ti figures=%s", report["ti_eval"])
    write_cards(out, report)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
