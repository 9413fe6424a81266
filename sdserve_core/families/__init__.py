"""Model families: what differs between kinds of diffusion model, behind one small protocol.

A family knows which diffusers pipeline class runs each task over its components, how a prompt becomes text
embeddings, and which tasks a denoiser with a given number of input channels can run. Everything else is shared:
sdserve_core.components loads the weights, sdserve_core.pipeline turns a PipelineCall into the pipeline's
arguments (one module per task), times the steps and calls the pipeline, and the server and the sidecar only ever
go through that path. The only family today is Stable Diffusion 1.x (`sd15`, which also runs the SD 2.x layouts:
same pipelines, same components).

How another family plugs in:

- SDXL (a second family): `sdxl.py` with a class like `StableDiffusion1` whose `pipeline_classes` are the
  StableDiffusionXL*Pipeline names (so `family_of` picks it from model_index.json) and whose `pipeline` builds
  those classes; `Components` gains optional `text_encoder_2` / `tokenizer_2` fields (None for SD 1.x) that
  `load_components` fills when the folder has them; `encode_prompt` runs both encoders, and the pooled
  embeddings travel in PipelineCall beside the prompt embeddings (the task modules pass them on when present).
- A transformer / flow-matching family (SD3, Flux, ...): the same, with the denoiser loaded from `transformer/`
  instead of `unet/` (Components' denoiser field generalises to whichever the family names) and a
  flow-matching scheduler from the folder; the task modules' arguments (prompt embeddings, steps, guidance,
  size, generators, images, masks, strength, the step callback) are the ones those pipelines take too.

Add the new family to FAMILIES; nothing in service/ or model_manager/ changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sdserve_core.families.sd15 import SD15
from sdserve_core.tasks import Task

if TYPE_CHECKING:
    from sdserve_core.components import Components


class Family(Protocol):
    """How one kind of model is run."""

    @property
    def name(self) -> str:
        """The family's id, as stored in Components.family."""

    @property
    def pipeline_classes(self) -> frozenset[str]:
        """The model_index.json `_class_name` values of this family's folders."""

    def tasks(self, in_channels: int) -> tuple[Task, ...]:
        """The tasks a denoiser with `in_channels` input channels can run."""

    def pipeline(self, components: Components, task: Task, scheduler: Any) -> Any:
        """A new diffusers pipeline for `task` over the shared components with `scheduler`; progress bar off."""

    def encode_prompt(
        self,
        components: Components,
        prompt: str,
        negative_prompt: str,
        clip_skip: int,
        cfg: bool,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's embeddings and, with classifier-free guidance (`cfg`), the negative prompt's."""


FAMILIES: dict[str, Family] = {SD15.name: SD15}
# Folders whose pipeline class no family claims are run as SD 1.x, as every folder was before families existed.
DEFAULT = SD15


def get(name: str) -> Family:
    """The family called `name` (Components.family); ValueError when there is none."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of(source: Path | str) -> Family:
    """The family of a diffusers folder (from its model_index.json) or of a pipeline class name."""
    class_name = source if isinstance(source, str) else _pipeline_class(source)
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    return DEFAULT


def _pipeline_class(folder: Path) -> str:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        # Unreadable: the folder's other checks report it; it is run as the default family meanwhile.
        return ""
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""
