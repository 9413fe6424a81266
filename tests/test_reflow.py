"""Stage 2c (`training.shapes.reflow`): sampling with every step kept, snapping samples to exact renders, the
on-policy loop, and where the CLI and export take their UNets from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTokenizer

from service.settings import REPO_ROOT
from training.shapes import cli
from training.shapes.configs import inference_scheduler, new_text_encoder, new_unet
from training.shapes.data import Scene, render
from training.shapes.evaluate import judge
from training.shapes.export import t2i_dir, terminal_dir
from training.shapes.grammar import Attributes
from training.shapes.loop import Progress, UNetStage, seed_everything
from training.shapes.reflow import LATE_FROM, SAMPLE_STEPS, Trajectories, fit_reflow, sample_trajectories, snap_targets
from training.shapes.tensors import encode_moments, to_images, to_tensor
from training.shapes.text import token_ids

SHAPES = REPO_ROOT / "models" / "shapes"


def _vae() -> AutoencoderKL:
    vae: AutoencoderKL = AutoencoderKL.from_pretrained(str(SHAPES / "vae")).eval()
    return vae


def _runs(asked: list[Attributes], drawn: list[Scene], vae: AutoencoderKL) -> Trajectories:
    """Runs whose final latents are the posterior means of the drawn renders (the states are not looked at)."""
    mean, _ = encode_moments(vae, to_tensor(np.stack([np.asarray(render(s)) for s in drawn])))
    n = len(asked)
    return Trajectories(
        states=torch.zeros(n, SAMPLE_STEPS, 4, 16, 16, dtype=torch.float16),
        timesteps=torch.arange(999, 0, -50),
        final=mean * float(vae.config.scaling_factor),
        attrs=asked,
        guidance=torch.full((n,), 2.0),
    )


def test_snap_keeps_right_layouts_and_gives_the_asked_shape_in_the_drawn_box() -> None:
    vae = _vae()
    square = Attributes("square", "red", "blue", "small", "left")
    drawn = [
        Scene(square, 16.0, 11.0, 32.0),  # right: kept as it is
        Scene(Attributes("circle", "red", "blue", "small", "left"), 16.0, 12.0, 30.0),  # asked a square: corrected
        Scene(Attributes("square", "green", "blue", "small", "left"), 16.0, 11.0, 32.0),  # wrong colour: dropped
        Scene(Attributes("square", "red", "blue", "small", "right"), 16.0, 53.0, 32.0),  # wrong place: dropped
        Scene(Attributes("square", "red", "blue", "large", "left"), 28.0, 15.5, 32.0),  # not small: dropped
    ]
    keep, targets, counts = snap_targets(vae, _runs([square] * len(drawn), drawn, vae))
    assert keep == [0, 1]
    assert counts == {"sampled": 5, "kept": 2, "shape_corrected": 1}
    assert targets.shape == (2, 4, 16, 16)
    with torch.no_grad():
        images = to_images(vae.decode(targets / float(vae.config.scaling_factor)).sample)
    for image, scene in zip(images, drawn[:2], strict=True):
        j = judge(image)
        # The target is a square in the colours asked, where the sample put its shape and as big.
        assert (j.shape, j.colour, j.background) == ("square", "red", "blue")
        assert abs(j.side - scene.side) < 1.5 and abs(j.cx - scene.cx) < 1.5 and abs(j.cy - scene.cy) < 1.5


def test_snap_names_the_problem_when_nothing_is_right() -> None:
    vae = _vae()
    asked = Attributes("circle", "white", "black")
    drawn = Scene(Attributes("circle", "yellow", "black"), 30.0, 32.0, 32.0)
    try:
        snap_targets(vae, _runs([asked], [drawn], vae))
    except RuntimeError as err:
        assert "no sample had its colours, size and position right" in str(err)
    else:
        raise AssertionError("snap_targets accepted runs with nothing to learn from")


def test_sampling_keeps_each_step_input_and_is_seeded() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(
        str(SHAPES), safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    runs = sample_trajectories(pipe, 3, seed=5, progress=Progress("test"))
    assert runs.states.shape == (3, SAMPLE_STEPS, 4, 16, 16) and runs.final.shape == (3, 4, 16, 16)
    assert int(runs.timesteps[0]) == 999 and len(runs.timesteps) == SAMPLE_STEPS
    assert runs.guidance.tolist() == [2.0] * 3 and len(runs.attrs) == 3
    # The first state is the seeded starting noise; one DDIM step from the last state gives the final latents.
    noise = torch.randn((3, 4, 16, 16), generator=torch.Generator().manual_seed(5_000))
    assert torch.equal(runs.states[:, 0], noise.half())
    again = sample_trajectories(pipe, 3, seed=5, progress=Progress("test"))
    assert torch.equal(runs.states, again.states) and torch.equal(runs.final, again.final)
    assert runs.attrs == again.attrs
    other = sample_trajectories(pipe, 3, seed=6, progress=Progress("test"))
    assert not torch.equal(runs.final, other.final)


def _fit(steps: int, seed: int, timesteps: list[int] | None = None) -> tuple[dict[str, torch.Tensor], float, float]:
    tokenizer = CLIPTokenizer.from_pretrained(str(SHAPES / "tokenizer"))
    seed_everything(0)
    text_encoder, unet = new_text_encoder(tokenizer), new_unet()
    text_encoder.requires_grad_(False)
    if timesteps is not None:  # record the timesteps of every UNet call
        seen = timesteps

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.extend(int(t) for t in args[1])

        unet.register_forward_pre_hook(hook)
    text_before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    ddim = inference_scheduler()
    ddim.set_timesteps(SAMPLE_STEPS)
    runs = Trajectories(
        states=torch.randn(2, SAMPLE_STEPS, 4, 16, 16, generator=gen).half(),
        timesteps=ddim.timesteps.clone(),
        final=torch.zeros(2, 4, 16, 16),
        attrs=[Attributes("square", "red", "blue", "small"), Attributes("circle", "white", "black")],
        guidance=torch.tensor([2.0, 3.0]),
    )
    latents = torch.randn(4, 4, 16, 16, generator=gen)
    ids = token_ids(tokenizer, ["a red circle on a blue background"] * 4)
    x0_on = torch.randn(2, 4, 16, 16, generator=gen)
    stage = UNetStage(Path("unused"), Path("unused"), 0.0, seed, steps=steps, precision="fp32", batch=4)
    figures = fit_reflow(unet, text_encoder, tokenizer, latents, ids, runs, [0, 1], x0_on, stage, seed)
    assert all(torch.equal(v, text_encoder.state_dict()[k]) for k, v in text_before.items()), "text encoder moved"
    final_loss = figures["final_loss"]
    assert isinstance(final_loss, float)
    return unet.state_dict(), final_loss, float(figures["steps"])


def test_reflow_loop_is_seeded_and_uses_only_late_states() -> None:
    seen: list[int] = []
    after, _, steps = _fit(3, seed=2, timesteps=seen)
    assert steps == 3
    ddim = inference_scheduler()
    ddim.set_timesteps(SAMPLE_STEPS)
    late = {int(t) for t in ddim.timesteps[LATE_FROM:]}
    # Each step: one call on 2 plain + 2 on-policy items, one unconditional call on the 2 on-policy states.
    assert len(seen) == 3 * (4 + 2)
    for step in range(3):
        call = seen[6 * step : 6 * step + 6]
        assert set(call[2:4]) <= late and call[4:6] == call[2:4]
    again, _, _ = _fit(3, seed=2)
    assert all(torch.equal(v, again[k]) for k, v in after.items()), "the same seed gave different weights"
    other, _, _ = _fit(3, seed=3)
    assert any(not torch.equal(v, other[k]) for k, v in after.items()), "another seed gave the same weights"


def test_stage_order_and_which_unet_each_stage_takes(tmp_path: Path) -> None:
    assert cli.STAGES.index("decoder") < cli.STAGES.index("reflow") < cli.STAGES.index("export")
    assert abs(sum(cli.SHARES.values()) - 1.0) < 1e-9
    assert cli.parse_args([]).budget_minutes == cli.DEFAULT_BUDGET < cli.RECIPE_BUDGET
    # The recipe's budget gives each stage its minutes; the default scales them all down alike.
    assert {s: cli.RECIPE_BUDGET * cli.SHARES[s] for s in cli.MINUTES} == pytest.approx(cli.MINUTES)
    assert pytest.approx(sum(cli.MINUTES.values())) == cli.RECIPE_BUDGET
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert terminal_dir(tmp_path) == t2i_dir(tmp_path) == tmp_path / "t2i"
    for stage in ("t2i-terminal", "t2i-reflow"):
        (tmp_path / stage / "unet").mkdir(parents=True)
        (tmp_path / stage / weights).write_bytes(b"")
    # Export ships the reflow UNet; inpainting and reflow itself start from stage 2b's.
    assert t2i_dir(tmp_path) == tmp_path / "t2i-reflow"
    assert terminal_dir(tmp_path) == tmp_path / "t2i-terminal"
