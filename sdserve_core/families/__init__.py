"""Model families: what differs between kinds of diffusion model, behind one small protocol.

A family knows which diffusers pipeline class runs each task over its components, how a prompt becomes text
embeddings (PromptEmbeds), which extra arguments its pipelines take (SDXL: pooled embeddings, size/crop
micro-conditioning, aesthetic scores, denoising_start/end for the refiner hand-off), how latents become pixels and
preview colours, and which tasks a folder can run. Everything else is shared: sdserve_core.components loads the
weights, sdserve_core.pipeline turns a PipelineCall into the pipeline's arguments (one module per task, then the
family's own), times the steps and calls the pipeline, and the server and the sidecar only ever go through that
path. The families today:

- `sd15`: Stable Diffusion 1.x and the SD 2.x layouts (same pipelines, same components);
- `sdxl`: SDXL base, refiner (second text encoder only, aesthetic-score conditioning) and inpainting.

How a transformer / flow-matching family (SD3, Flux, ...) plugs in as a third: a module like sdxl.py whose
`pipeline_classes` are its pipelines' names (so `family_of` picks it from model_index.json), whose `pipeline`
builds them over Components (the denoiser field generalises to whichever module the family names: `transformer/`
instead of `unet/`), whose `encode_prompt` fills PromptEmbeds (pooled embeddings travel there already) and whose
`add_kwargs` adds what its pipelines take beyond the shared arguments (prompt embeddings, steps, guidance, size,
generators, images, masks, strength and the step callback are what those pipelines take too). Add it to FAMILIES;
nothing in service/ or model_manager/ changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from sdserve_core import family_index
from sdserve_core.families.sd15 import SD15
from sdserve_core.families.sdxl import SDXL
from sdserve_core.family_index import Traits
from sdserve_core.model_folder import LatentRGB
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.tasks import Task
from sdserve_core.weighted import TokenEmbedding

if TYPE_CHECKING:
    from sdserve_core.components import Components
    from sdserve_core.pipeline.call import PipelineCall

__all__ = ["DEFAULT", "FAMILIES", "Family", "TokenEmbedding", "Traits", "family_of", "get", "traits_of"]


class Family(Protocol):
    """How one kind of model is run."""

    @property
    def name(self) -> str:
        """The family's id, as stored in Components.family."""

    @property
    def pipeline_classes(self) -> frozenset[str]:
        """The model_index.json `_class_name` values of this family's folders."""

    @property
    def latent_rgb(self) -> LatentRGB:
        """The preview projection of this family's latent space, for folders whose sdserve.json fits none."""

    def traits(self, index: dict[str, Any], in_channels: int) -> Traits:
        """What a folder with this model_index.json and a denoiser of `in_channels` input channels can do."""

    def pipeline(self, components: Components, task: Task, scheduler: Any) -> Any:
        """A new diffusers pipeline for `task` over the shared components with `scheduler`; progress bar off."""

    def encode_prompt(
        self,
        components: Components,
        inputs: PromptInputs,
        cfg: bool,
        device: torch.device | str,
        *,
        vocab: Mapping[str, TokenEmbedding] | None = None,
    ) -> PromptEmbeds:
        """One image's embeddings of `inputs`; the negative ones only with classifier-free guidance (`cfg`).
        The texts may use A1111's syntax (docs/prompts.md: weights, BREAK, prompts longer than one chunk, whose
        embeddings are that many times longer: group calls on PromptEmbeds.seq_len); `vocab` maps the
        textual-inversion tokens the texts may name to their vectors. Texts without any of that are encoded by
        diffusers' encode_prompt exactly as before."""

    def add_kwargs(self, components: Components, call: PipelineCall, kwargs: dict[str, Any]) -> None:
        """Adds the family's own pipeline arguments for `call` to `kwargs` (the task module's); ValueError when the
        call asks for something the family does not have (micro-conditioning on SD 1.x, for instance)."""

    def decode(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of denoised `latents` (as the family's pipelines decode them)."""


FAMILIES: dict[str, Family] = {SD15.name: SD15, SDXL.name: SDXL}
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
    return FAMILIES[family_index.family_name(source)]


traits_of = family_index.traits_of
