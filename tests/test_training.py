"""The shapes training loop (`training.shapes.unet.fit`) and the recipe sweep's command line, on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from service.settings import REPO_ROOT
from training.shapes import probe, sweep
from training.shapes.configs import new_text_encoder, new_unet, train_scheduler
from training.shapes.loop import Budget, Progress, seed_everything
from training.shapes.text import token_ids
from training.shapes.unet import TERMINAL, fit

SHAPES = REPO_ROOT / "models" / "shapes"
TOKENIZER = SHAPES / "tokenizer"


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


def test_probe_follows_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One prompt of each shape through every stage; the JSON file and stdout carry the same figures.
    out, sheet = tmp_path / "probe.json", tmp_path / "sheet.png"
    args = ["--model", str(SHAPES), "--n", "3", "--steps", "4", "--strengths", "0.3,0.6"]
    assert probe.main([*args, "--json", str(out), "--sheet", str(sheet)]) == 0
    figures = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == figures
    assert figures["guidance"] == 3.0, "the folder's default guidance was not used"
    stages = ["exact", "round_trip", "edit_0.3", "edit_0.6", "generated"]
    assert [k for k in figures if k not in ("model", "n", "steps", "guidance")] == stages
    for stage in stages:
        assert set(figures[stage]) == {"circle", "square", "triangle"}, stage
        for shape, row in figures[stage].items():
            assert row["of"] == 1 and row["right"] in (0, 1) and 0 < row["fill"] <= 1, (stage, shape, row)
    # Exact renders are the scorer's own ground truth: every class right, a square fills its box.
    assert all(row["right"] == 1 for row in figures["exact"].values())
    assert figures["exact"]["square"]["fill"] == 1.0
    with Image.open(sheet) as im:
        assert im.size == (128, 128 * len(stages)), "one column per square prompt, one row per stage"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strengths", "0.3,1.5"], "--strengths: each strength must be in (0, 1], got 1.5"),
        (["--strengths", "0.3,high"], "--strengths: comma-separated numbers expected"),
        (["--n", "0"], "--n"),
        (["--steps", "2", "--strengths", "0.3"], "--strengths: 0.3 of --steps 2 is no denoising step"),
        (["--model", "no/such/folder"], "--model: no diffusers folder"),
    ],
)
def test_probe_names_bad_arguments(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe.json"
    with pytest.raises(SystemExit) as exc:
        probe.main([*args, "--json", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "a rejected command wrote figures"
