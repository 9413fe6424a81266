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
from .adapters import LORA_NAME, TI_NAME, AdapterRun, lora_scenes, save_lora, save_ti, train_lora, train_ti
from .grammar import TI_CANDIDATES, TI_COLOUR
from .refine import refine_lora, refine_ti

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
    base, lora = train_lora(run)
    if run.refine_steps:
        new, old = lora_scenes(base, run)
        batch = max(1, run.batch // 4)
        lora |= refine_lora(run.model, base, new, old, run.refine_steps, batch, default_guidance(run.model), run.seed)
    save_lora(base, out / LORA_NAME)
    del base
    gc.collect()
    report["lora"] = {**lora, "batch": run.batch}
    return publish(run.model, out, report, n, steps, report_path)


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
