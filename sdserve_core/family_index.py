"""Which family a model folder belongs to and what it can do, from its JSON configs alone (no torch import): the
sidecar reads this for every stored model, and sdserve_core.families builds on it.

A folder's family is the one whose pipeline classes include its model_index.json `_class_name`; folders whose
class no family claims are SD 1.x, as every folder was before families existed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sdserve_core.tasks import Task

SD15 = "sd15"
SDXL = "sdxl"
# model_index.json `_class_name` of each family's Generate, Edit and Inpaint pipelines.
PIPELINE_CLASSES: dict[str, dict[Task, str]] = {
    SD15: {
        Task.GENERATE: "StableDiffusionPipeline",
        Task.EDIT: "StableDiffusionImg2ImgPipeline",
        Task.INPAINT: "StableDiffusionInpaintPipeline",
    },
    SDXL: {
        Task.GENERATE: "StableDiffusionXLPipeline",
        Task.EDIT: "StableDiffusionXLImg2ImgPipeline",
        Task.INPAINT: "StableDiffusionXLInpaintPipeline",
    },
}
DEFAULT = SD15
ALL_TASKS = (Task.GENERATE, Task.EDIT, Task.INPAINT)


@dataclasses.dataclass(frozen=True)
class Traits:
    """What one model folder can do: its tasks, and whether it is a refiner (a second-pass model that runs Edit and
    can be named as another request's refiner)."""

    tasks: tuple[Task, ...]
    refiner: bool = False


def traits(family: str, index: dict[str, Any], in_channels: int) -> Traits:
    """A 9-channel (inpainting) UNet only inpaints, in every family. An SDXL refiner (model_index.json's
    `requires_aesthetics_score`) edits and inpaints but cannot start from noise: its UNet was trained on the last
    part of the schedule. Everything else runs every task."""
    if in_channels == 9:
        return Traits((Task.INPAINT,))
    if family == SDXL and index.get("requires_aesthetics_score"):
        return Traits((Task.EDIT, Task.INPAINT), refiner=True)
    return Traits(ALL_TASKS)


def family_name(source: Path | str) -> str:
    """The family of a diffusers folder (from its model_index.json) or of a pipeline class name."""
    class_name = (
        source if isinstance(source, str) else str(read_json(source / "model_index.json").get("_class_name", ""))
    )
    for name, classes in PIPELINE_CLASSES.items():
        if class_name in classes.values():
            return name
    return DEFAULT


def traits_of(folder: Path) -> Traits:
    """What the model in a diffusers folder can do, from its configs (no weights read)."""
    index = read_json(folder / "model_index.json")
    unet = read_json(folder / "unet" / "config.json")
    return traits(family_name(folder), index, int(unet.get("in_channels", 4)))


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when it is missing, unreadable or not an object (the folder's other checks
    report that; the folder is the default family meanwhile)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
