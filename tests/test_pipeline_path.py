"""One way to run a pipeline: only sdserve_core.families and sdserve_core.pipeline touch diffusers pipelines, and
sdserve_core.pipeline.run makes exactly the images of a direct diffusers call with the same arguments."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdserve_core import families
from sdserve_core.components import Components, load_components
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import run, step_seconds, warm_up
from sdserve_core.pipeline.steps import StepCallback, StopDenoising
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.tasks import Task
from service.settings import REPO_ROOT
from tests.harness import TINY, TINY_INPAINT, sample_image, sample_mask

PACKAGES = ("service", "model_manager", "sdserve_core")
ALLOWED = ("sdserve_core/families/", "sdserve_core/pipeline/")
# Arguments only a diffusers pipeline call takes (as keywords or as the keys of a kwargs dict).
PIPELINE_ARGUMENTS = {"num_inference_steps", "callback_on_step_end", "padding_mask_crop", "num_images_per_prompt"}
PROMPT = "a red circle"


def _root_name(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def pipeline_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) of every diffusers pipeline class referenced and every pipeline call's argument or callee."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusers":
            found += [(node.lineno, f"imports {a.name}") for a in node.names if "Pipeline" in a.name]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if "pipelines" in a.name.split(".")]
        elif isinstance(node, ast.Attribute) and "Pipeline" in node.attr and _root_name(node) == "diffusers":
            found.append((node.lineno, f"uses diffusers.{node.attr}"))
        elif isinstance(node, ast.keyword) and node.arg in PIPELINE_ARGUMENTS:
            found.append((node.value.lineno, f"passes {node.arg}="))
        elif isinstance(node, ast.Constant) and node.value in PIPELINE_ARGUMENTS:
            found.append((node.lineno, f"names {node.value!r}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipe":
            found.append((node.lineno, "calls pipe(...)"))
    return found


def test_the_ast_check_sees_a_direct_pipeline_call() -> None:
    source = (
        "import diffusers\nfrom diffusers import StableDiffusionPipeline as P\n"
        "pipe = diffusers.StableDiffusionInpaintPipeline(**c)\npipe(prompt='', num_inference_steps=1)\n"
        "common = {'callback_on_step_end': tick}\n"
    )
    assert sorted(line for line, _ in pipeline_uses(ast.parse(source))) == [2, 3, 4, 4, 5]


def test_only_families_and_pipeline_touch_diffusers_pipelines() -> None:
    offences = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel.startswith(ALLOWED):
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), rel)
            offences += [f"{rel}:{line} {what}" for line, what in sorted(pipeline_uses(tree))]
    assert not offences, "diffusers pipelines outside sdserve_core/families and sdserve_core/pipeline:\n" + "\n".join(
        offences
    )


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Components:
    return load_components(models_dir / TINY, "fp32", torch.float32, "cpu")


@pytest.fixture(scope="module")
def tiny_inpaint(models_dir: Path) -> Components:
    return load_components(models_dir / TINY_INPAINT, "fp32", torch.float32, "cpu")


_DIRECT: dict[tuple[Path, Task], Any] = {}


def direct(folder: Path, task: Task, scheduler: Any, **kwargs: Any) -> Any:
    """The images of diffusers' own pipeline loaded from the folder (not sdserve's components), called directly."""
    cls = {
        Task.GENERATE: diffusers.StableDiffusionPipeline,
        Task.EDIT: diffusers.StableDiffusionImg2ImgPipeline,
        Task.INPAINT: diffusers.StableDiffusionInpaintPipeline,
    }[task]
    if (folder, task) not in _DIRECT:
        loaded = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        loaded.set_progress_bar_config(disable=True)
        _DIRECT[folder, task] = loaded
    pipe = _DIRECT[folder, task]
    pipe.scheduler = scheduler
    with torch.inference_mode():
        return pipe(**kwargs).images


def scheduler_of(folder: Path, name: str = "DDIMScheduler") -> Any:
    return getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")


def gens(seed: int, n: int) -> tuple[torch.Generator, ...]:
    return tuple(torch.Generator("cpu").manual_seed(seed + i) for i in range(n))


def embeds(components: Components, count: int, negative: str = "") -> PromptEmbeds:
    """What the server passes: the family's embeddings of one prompt, repeated per image."""
    inputs = PromptInputs(PROMPT, negative)
    found = families.get(components.family).encode_prompt(components, inputs, True, "cpu")
    assert found.negative is not None
    return found.repeat(count)


def assert_identical(ours: Any, theirs: Any) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        assert a_arr.shape == b_arr.shape and np.array_equal(a_arr, b_arr)


def assert_parity(
    components: Components,
    folder: Path,
    task: Task,
    seed: int,
    count: int,
    steps: int,
    *,
    size: int = 64,
    scheduler: str = "DDIMScheduler",
    negative: str = "",
    guidance: float = 7.5,
    call: dict[str, Any] | None = None,
    theirs: dict[str, Any] | None = None,
) -> Any:
    """Runs `task` through sdserve_core.pipeline.run with the family's embeddings (as the server does) and through
    diffusers' own pipeline with the text prompt, the same seeds and `theirs`; asserts identical images and returns
    ours."""
    ours = run(
        components,
        PipelineCall(
            task,
            steps,
            size,
            size,
            gens(seed, count),
            guidance_scale=guidance,
            embeds=embeds(components, count, negative),
            **(call or {}),
        ),
        scheduler_of(folder, scheduler),
    )
    common: dict[str, Any] = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": list(gens(seed, count)),
    }
    if negative:
        common["negative_prompt"] = negative
    assert_identical(ours, direct(folder, task, scheduler_of(folder, scheduler), **common, **(theirs or {})))
    return ours


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_generate_with_embeddings_is_diffusers(tiny: Components, models_dir: Path, scheduler: str) -> None:
    sized = {"num_images_per_prompt": 2, "height": 64, "width": 64}
    ours = assert_parity(
        tiny,
        models_dir / TINY,
        Task.GENERATE,
        42,
        2,
        3,
        scheduler=scheduler,
        negative="blue",
        guidance=6.0,
        theirs=sized,
    )
    assert all(isinstance(i, Image.Image) for i in ours)


def test_generate_with_a_text_prompt_and_one_generator_is_diffusers(tiny: Components, models_dir: Path) -> None:
    """The sidecar's quality render: a text prompt, one generator, an array out."""
    folder = models_dir / TINY
    call = PipelineCall(Task.GENERATE, 2, 64, 64, gens(0, 1)[0], output_type="np", guidance_scale=7.5, prompt=PROMPT)
    ours = run(tiny, call, scheduler_of(folder))
    theirs = direct(
        folder,
        Task.GENERATE,
        scheduler_of(folder),
        prompt=PROMPT,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=gens(0, 1)[0],
        output_type="np",
        height=64,
        width=64,
    )
    assert isinstance(ours, np.ndarray)
    assert_identical(ours, theirs)


def test_edit_is_diffusers(tiny: Components, models_dir: Path) -> None:
    image = sample_image()
    call = {"images": (image,), "strength": 0.6}
    assert_parity(tiny, models_dir / TINY, Task.EDIT, 7, 1, 4, call=call, theirs={"image": image, "strength": 0.6})


@pytest.mark.parametrize("model", [TINY, TINY_INPAINT])
def test_inpaint_is_diffusers(tiny: Components, tiny_inpaint: Components, models_dir: Path, model: str) -> None:
    components = tiny if model == TINY else tiny_inpaint
    image, mask = sample_image(), sample_mask()
    call = {"images": (image, image), "masks": (mask, mask), "strength": 0.9}
    theirs = {
        "image": [image, image],
        "mask_image": [mask, mask],
        "strength": 0.9,
        "num_images_per_prompt": 2,
        "height": 64,
        "width": 64,
    }
    assert_parity(components, models_dir / model, Task.INPAINT, 3, 2, 3, call=call, theirs=theirs)


def test_inpaint_mask_only_is_diffusers_padding_mask_crop(tiny_inpaint: Components, models_dir: Path) -> None:
    image, mask = sample_image(96, 96), sample_mask(96, 96)
    call = {"images": (image, image), "masks": (mask, mask), "strength": 1.0, "mask_padding": 8}
    theirs = {
        "image": image,
        "mask_image": mask,
        "padding_mask_crop": 8,
        "num_images_per_prompt": 2,
        "height": 32,
        "width": 32,
    }
    ours = assert_parity(
        tiny_inpaint, models_dir / TINY_INPAINT, Task.INPAINT, 9, 2, 3, size=32, call=call, theirs=theirs
    )
    assert ours[0].size == (96, 96)


class Watch:
    """A StepObserver that records the steps and stops after `stop_after` of them."""

    def __init__(self, stop_after: int = 1000):
        self.stop_after = stop_after
        self.seen: list[tuple[int, int, tuple[int, ...]]] = []

    def go_on(self) -> bool:
        return len(self.seen) < self.stop_after

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        self.seen.append((step, total, tuple(latents.shape)))


def test_the_step_callback_times_observes_and_stops(tiny: Components, models_dir: Path) -> None:
    folder = models_dir / TINY
    call = PipelineCall(Task.GENERATE, 3, 64, 64, gens(0, 2), output_type="latent", prompt=("", ""))
    watch = Watch()
    clock = StepCallback(watch)
    latents = run(tiny, call, scheduler_of(folder), clock)
    assert tuple(latents.shape) == (2, 4, 16, 16)
    assert watch.seen == [(1, 3, (2, 4, 16, 16)), (2, 3, (2, 4, 16, 16)), (3, 3, (2, 4, 16, 16))]
    assert clock.count == 3 and 0 < clock.first < clock.last and clock.preview >= 0
    assert clock.seconds_per_step() > 0

    stopped = Watch(stop_after=1)
    clock = StepCallback(stopped)
    with pytest.raises(StopDenoising):
        run(tiny, call, scheduler_of(folder), clock)
    assert [s for s, _, _ in stopped.seen] == [1] and clock.count == 1


def test_pipeline_call_refuses_incomplete_calls() -> None:
    g = gens(0, 1)
    cases: list[Callable[[], PipelineCall]] = [
        lambda: PipelineCall(Task.GENERATE, 1, 64, 64, g),
        lambda: PipelineCall(Task.GENERATE, 1, 64, 64, g, prompt="x", embeds=PromptEmbeds(torch.zeros(1, 77, 32))),
        lambda: PipelineCall(Task.EDIT, 1, 64, 64, g, prompt="x"),
        lambda: PipelineCall(Task.INPAINT, 1, 64, 64, g, prompt="x", images=sample_image()),
        lambda: PipelineCall(Task.GENERATE, 1, 64, 64, g, prompt="x", mask_padding=8),
    ]
    for make in cases:
        with pytest.raises(ValueError):
            make()


def test_warm_up_and_step_seconds_run_on_tiny_models(
    tiny: Components, tiny_inpaint: Components, models_dir: Path
) -> None:
    assert families.get(tiny_inpaint.family).traits({}, tiny_inpaint.in_channels).tasks == (Task.INPAINT,)
    warm_up(tiny, Task.GENERATE, 64, 64, scheduler_of(models_dir / TINY))
    warm_up(tiny_inpaint, Task.INPAINT, 64, 64, scheduler_of(models_dir / TINY_INPAINT))
    for images in (1, 2):
        seconds = step_seconds(tiny, images, 3, 64, 64, scheduler_of(models_dir / TINY))
        assert 0 < seconds < 60


def test_family_of_reads_model_index(models_dir: Path, tmp_path: Path) -> None:
    assert families.family_of(models_dir / TINY).name == "sd15"
    assert families.family_of(models_dir / TINY_INPAINT).name == "sd15"
    assert families.family_of("StableDiffusionImg2ImgPipeline") is families.get("sd15")
    assert families.family_of(tmp_path) is families.DEFAULT
    with pytest.raises(ValueError, match="unknown model family"):
        families.get("nope")
