"""The shapes training loop (`training.shapes.unet.fit`) and the recipe sweep's command line, on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTokenizer

from service.settings import REPO_ROOT
from training.shapes import cli, grammar, probe, sweep
from training.shapes.configs import new_text_encoder, new_unet, train_scheduler
from training.shapes.data import Scene, render
from training.shapes.decoder import EDGE_WEIGHT, edge_weights
from training.shapes.grammar import Attributes
from training.shapes.loop import Budget, Progress, autocast, recon_loss, resolve_precision, seed_everything
from training.shapes.tensors import to_tensor
from training.shapes.text import token_ids
from training.shapes.tokenizer import MAX_LENGTH, build_tokenizer
from training.shapes.unet import TERMINAL, fit, load_or_build_cache

SHAPES = REPO_ROOT / "models" / "shapes"
TOKENIZER = SHAPES / "tokenizer"


def _train(
    steps: int, seed: int, precision: str = "fp32", batch: int = 64, seen: list[int] | None = None
) -> tuple[dict[str, float | str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    seed_everything(0)
    text_encoder, unet = new_text_encoder(tokenizer), new_unet()
    if seen is not None:  # record the batch size of every UNet call
        record = seen

        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            record.append(len(inputs[0]))

        unet.register_forward_pre_hook(hook)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    latents = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = token_ids(
        tokenizer, ["a red circle on a blue background", "a small green square on the left on a white background"] * 4
    )
    empty = token_ids(tokenizer, [""])[0]
    budget = Budget(0.0, TERMINAL.warmup, steps)
    sched, progress = train_scheduler(), Progress("test")
    run = (seed, "cpu", precision, batch)
    figures = fit(unet, text_encoder, latents, ids, empty, sched, TERMINAL, budget, progress, *run)
    return figures, before, unet.state_dict()


def test_decoder_loss_weighs_edges_and_corners() -> None:
    import numpy as np

    x = to_tensor(np.asarray(render(Scene(Attributes("square", "red", "blue"), 16.0, 32.0, 32.0)))[None])
    w = edge_weights(x)
    assert w.shape == (1, 1, 64, 64)
    # Flat background and the shape's inside weigh 1; the square's edge pixels weigh up to 1 + EDGE_WEIGHT.
    assert float(w[0, 0, 2, 2]) == 1.0 and float(w[0, 0, 32, 32]) == 1.0
    assert 1 + 0.5 * EDGE_WEIGHT <= float(w[0, 0, 32, 24]) <= 1 + EDGE_WEIGHT
    # The same error costs more on an edge than on the background; unweighted, both cost the same.
    err = torch.zeros_like(x)
    on_edge, on_flat = err.clone(), err.clone()
    on_edge[..., 32, 24] = 0.5
    on_flat[..., 2, 2] = 0.5
    assert recon_loss(x + on_edge, x)[0] == pytest.approx(float(recon_loss(x + on_flat, x)[0]))
    edge_loss, edge_l1 = recon_loss(x + on_edge, x, w)
    flat_loss, flat_l1 = recon_loss(x + on_flat, x, w)
    assert float(edge_loss) > 2.5 * float(flat_loss) > 0
    assert float(edge_l1) == pytest.approx(float(flat_l1))  # the logged L1 stays unweighted


def test_fit_runs_the_steps_asked_and_is_seeded() -> None:
    figures, before, after = _train(2, seed=3)
    assert figures["steps"] == 2 and figures["precision"] == "fp32"
    assert isinstance(figures["final_loss"], float) and torch.isfinite(torch.tensor(figures["final_loss"]))
    assert any(not torch.equal(before[k], after[k]) for k in before), "two steps left every weight unchanged"
    _, _, again = _train(2, seed=3)
    assert all(torch.equal(after[k], again[k]) for k in after), "the same seed gave different weights"
    _, _, other = _train(2, seed=4)
    assert any(not torch.equal(after[k], other[k]) for k in after), "another seed gave the same weights"


def test_fit_draws_the_batch_size_asked() -> None:
    seen: list[int] = []
    figures, _, _ = _train(3, seed=3, batch=5, seen=seen)
    assert seen == [5, 5, 5] and figures["batch"] == 5
    seen.clear()
    _train(1, seed=3, seen=seen)
    assert seen == [64]


def test_bf16_fit_is_seeded_and_tracks_fp32() -> None:
    # bf16 autocast changes the arithmetic (so the weights), not what is learnt: the loss stays within 1%.
    figures, _, after = _train(2, seed=3, precision="bf16")
    assert figures["precision"] == "bf16"
    _, _, again = _train(2, seed=3, precision="bf16")
    assert all(torch.equal(after[k], again[k]) for k in after), "the same seed gave different bf16 weights"
    fp32_figures, _, fp32 = _train(2, seed=3)
    assert any(not torch.equal(after[k], fp32[k]) for k in after), "bf16 training ran in fp32"
    loss, fp32_loss = figures["final_loss"], fp32_figures["final_loss"]
    assert isinstance(loss, float) and isinstance(fp32_loss, float) and abs(loss - fp32_loss) < 0.01 * fp32_loss


def test_autocast_and_precision_choices() -> None:
    unet, x, emb = new_unet().eval(), torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
    with torch.no_grad(), autocast("bf16"):
        assert unet(x, 10, emb).sample.dtype == torch.bfloat16
    with torch.no_grad(), autocast("fp32"):
        assert unet(x, 10, emb).sample.dtype == torch.float32
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16")


def test_training_cli_rejects_an_unknown_precision(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["unet", "--precision", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "'fp16'" in err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_training_cli_rejects_a_batch_below_one(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["unet", "--batch", value])
    assert exc.value.code == 2
    assert f"--batch must be at least 1, got {value}" in capsys.readouterr().err


def test_every_prompt_of_the_language_fits_the_token_length(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    saved = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == MAX_LENGTH
    longest = max(grammar.COLOURS, key=len)
    background = max((c for c in grammar.COLOURS if c != longest), key=len)
    prompts = [
        grammar.prompt_text(grammar.Attributes(shape, longest, background, size, position))
        for shape in grammar.SHAPES
        for size in (None, *grammar.SIZES)
        for position in (None, *grammar.POSITIONS)
    ]
    ids = token_ids(tokenizer, prompts)
    assert ids.shape == (len(prompts), MAX_LENGTH)
    eos = tokenizer.eos_token_id
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    assert max(lengths) < MAX_LENGTH, "the longest prompt would lose its end token"
    for row, n in zip(ids.tolist(), lengths, strict=True):
        assert row[n - 1] == eos and all(i == eos for i in row[n:])


def test_a_latent_cache_of_another_token_length_is_rebuilt(tmp_path: Path) -> None:
    vae = AutoencoderKL.from_pretrained(str(SHAPES / "vae")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    path = tmp_path / "t2i-latents.pt"
    stale = {"mean": torch.zeros(4, 4, 16, 16), "std": torch.zeros(4, 4, 16, 16), "ids": torch.zeros(4, 77).long()}
    torch.save(stale, path)
    cache = load_or_build_cache(path, vae, tokenizer, seed=1, n=4)
    assert cache["ids"].shape == (4, MAX_LENGTH) and cache["mean"].abs().sum() > 0
    assert torch.load(path)["ids"].shape == (4, MAX_LENGTH), "the rebuilt cache was not saved"
    marker = {**cache, "mean": torch.full((4, 4, 16, 16), 7.0)}
    torch.save(marker, path)
    assert torch.equal(load_or_build_cache(path, vae, tokenizer, seed=1, n=4)["mean"], marker["mean"])


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
    default = json.loads((SHAPES / "sdserve.json").read_text())["default_guidance_scale"]
    assert figures["guidance"] == default, "the folder's default guidance was not used"
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
