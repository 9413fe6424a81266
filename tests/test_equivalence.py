"""Served images equal the images from calling the diffusers pipelines directly.

Tolerance: every pixel within 1/255 of the direct result (in practice the arrays are identical: both
paths run the same fp32 CPU kernels with the same per-image CPU generators).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from sdserve import Client
from tests.harness import TINY, TINY_INPAINT, pixels, png, sample_image, sample_mask

TOLERANCE = 1

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "DPMPP_2M_KARRAS": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "UNIPC": ("UniPCMultistepScheduler", {}),
    "HEUN": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
}

_PIPES: dict[tuple[str, str], Any] = {}


def direct(models_dir: Path, model: str, task: str, scheduler: str, **kwargs: Any) -> list[np.ndarray]:
    """Runs the diffusers pipeline in-process, as a user would without sdserve."""
    cls = {
        "generate": diffusers.StableDiffusionPipeline,
        "edit": diffusers.StableDiffusionImg2ImgPipeline,
        "inpaint": diffusers.StableDiffusionInpaintPipeline,
    }[task]
    key = (model, task)
    if key not in _PIPES:
        _PIPES[key] = cls.from_pretrained(
            models_dir / model, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        _PIPES[key].set_progress_bar_config(disable=True)
        _PIPES[key].original_scheduler_config = dict(_PIPES[key].scheduler.config)
    pipe = _PIPES[key]
    cls_name, extra = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.original_scheduler_config, **extra)
    seed = kwargs.pop("seed")
    n = kwargs.pop("num_images", 1)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    images = pipe(**kwargs, num_images_per_prompt=n, generator=gens, output_type="pil").images
    return [np.asarray(i.convert("RGB"), dtype=np.int16) for i in images]


def assert_same(served: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(served) == len(expected)
    for s, e in zip(served, expected, strict=True):
        assert s.shape == e.shape
        assert int(np.abs(s - e).max()) <= TOLERANCE


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_generate_matches_diffusers(client: Client, models_dir: Path, scheduler: str) -> None:
    result = client.generate(
        "a red circle",
        negative_prompt="blue",
        steps=4,
        guidance_scale=6.0,
        seed=42,
        num_images=2,
        scheduler=scheduler,  # type: ignore[arg-type]
    )
    expected = direct(
        models_dir,
        TINY,
        "generate",
        scheduler,
        prompt="a red circle",
        negative_prompt="blue",
        num_inference_steps=4,
        guidance_scale=6.0,
        seed=42,
        num_images=2,
        height=64,
        width=64,
    )
    assert_same([pixels(i.data) for i in result.images], expected)
    assert [i.seed for i in result.images] == [42, 43]


@pytest.mark.parametrize("scheduler", ["DDIM", "EULER_ANCESTRAL", "DPMPP_2M_KARRAS", "UNIPC"])
def test_edit_matches_diffusers(client: Client, models_dir: Path, scheduler: str) -> None:
    image = sample_image()
    result = client.edit(
        png(image),
        "a green square",
        strength=0.6,
        steps=5,
        guidance_scale=7.5,
        seed=7,
        scheduler=scheduler,  # type: ignore[arg-type]
    )
    expected = direct(
        models_dir,
        TINY,
        "edit",
        scheduler,
        prompt="a green square",
        image=image,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=7.5,
        seed=7,
    )
    assert_same([pixels(result.image.data)], expected)


@pytest.mark.parametrize("model", [TINY, TINY_INPAINT])
@pytest.mark.parametrize("scheduler", ["DDIM", "EULER_ANCESTRAL", "DPMPP_2M_KARRAS", "UNIPC"])
def test_inpaint_matches_diffusers(client: Client, models_dir: Path, model: str, scheduler: str) -> None:
    image, mask = sample_image(), sample_mask()
    result = client.inpaint(
        png(image),
        png(mask),
        "a yellow triangle",
        steps=4,
        seed=3,
        model=model,
        scheduler=scheduler,  # type: ignore[arg-type]
    )
    expected = direct(
        models_dir,
        model,
        "inpaint",
        scheduler,
        prompt="a yellow triangle",
        image=image,
        mask_image=mask,
        num_inference_steps=4,
        guidance_scale=7.5,
        seed=3,
        height=64,
        width=64,
    )
    assert_same([pixels(result.image.data)], expected)


def test_inpaint_mask_only_matches_padding_mask_crop(client: Client, models_dir: Path) -> None:
    image, mask = sample_image(96, 96), sample_mask(96, 96)
    result = client.inpaint(
        png(image),
        png(mask),
        "a purple circle",
        steps=3,
        seed=9,
        model=TINY_INPAINT,
        area="mask_only",
        mask_padding=8,
        width=32,
        height=32,
        scheduler="DDIM",
    )
    expected = direct(
        models_dir,
        TINY_INPAINT,
        "inpaint",
        "DDIM",
        prompt="a purple circle",
        image=image,
        mask_image=mask,
        padding_mask_crop=8,
        num_inference_steps=3,
        guidance_scale=7.5,
        seed=9,
        height=32,
        width=32,
    )
    assert result.image.width == 96
    assert_same([pixels(result.image.data)], expected)
