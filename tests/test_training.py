"""The shapes training loop (`training.shapes.unet.fit`) and the recipe sweep's command line, on tiny inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from service.settings import REPO_ROOT
from training.shapes import sweep
from training.shapes.configs import new_text_encoder, new_unet, train_scheduler
from training.shapes.loop import Budget, Progress, seed_everything
from training.shapes.text import token_ids
from training.shapes.unet import TERMINAL, fit

TOKENIZER = REPO_ROOT / "models" / "shapes" / "tokenizer"


def _train(steps: int, seed: int) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    seed_everything(0)
    text_encoder, unet = new_text_encoder(tokenizer), new_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = token_ids(
        tokenizer, ["a red circle on a blue background", "a small green square on the left on a white background"] * 4
    )
    empty = token_ids(tokenizer, [""])[0]
    budget = Budget(0.0, TERMINAL.warmup, steps)
    figures = fit(unet, text_encoder, latents, ids, empty, train_scheduler(), TERMINAL, budget, Progress("test"), seed)
    return figures, before, unet.state_dict()


def test_fit_runs_the_steps_asked_and_is_seeded() -> None:
    figures, before, after = _train(2, seed=3)
    assert figures["steps"] == 2 and torch.isfinite(torch.tensor(figures["final_loss"]))
    assert any(not torch.equal(before[k], after[k]) for k in before), "two steps left every weight unchanged"
    _, _, again = _train(2, seed=3)
    assert all(torch.equal(after[k], again[k]) for k in after), "the same seed gave different weights"
    _, _, other = _train(2, seed=4)
    assert any(not torch.equal(after[k], other[k]) for k in after), "another seed gave the same weights"


def test_sweep_names_unknown_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--out", str(tmp_path / "out"), "--only", "B1_base,no_such_variant"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err and "no_such_variant" in err and "B1_base" in err
    assert not (tmp_path / "out").exists(), "a rejected command left an output folder behind"


def test_sweep_variants_match_the_cpu_budget() -> None:
    # Architecture variants get the steps their CPU cost buys in the base UNet's 2,609 + 1,650.
    for name, variant in sweep.VARIANTS.items():
        if name.startswith("B"):
            cost = sweep.ARCHS[variant.arch][1]
            assert variant.stage2_steps == round(2609 / cost) and variant.terminal_steps == round(1650 / cost), name
