"""SDXL: a UNet with text-time additional embeddings, two CLIP text encoders (the second's pooled, projected
output conditions the UNet), an AutoencoderKL that overflows in float16 (force_upcast), run by diffusers'
StableDiffusionXL(Img2Img|Inpaint)Pipeline. A refiner folder has only the second text encoder and a UNet
conditioned on an aesthetic score (model_index.json's `requires_aesthetics_score`); it runs Edit and Inpaint, and
takes over from a base model part-way through the schedule (denoising_start) or refines its decoded image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sdserve_core import family_index
from sdserve_core.components import Components
from sdserve_core.families.base import TextPipelines, vae_decode
from sdserve_core.family_index import Traits
from sdserve_core.model_folder import LatentRGB
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.tasks import Task

if TYPE_CHECKING:
    from sdserve_core.pipeline.call import PipelineCall

PIPELINE_CLASSES = {
    Task.GENERATE: "StableDiffusionXLPipeline",
    Task.EDIT: "StableDiffusionXLImg2ImgPipeline",
    Task.INPAINT: "StableDiffusionXLInpaintPipeline",
}
# The published linear latent-to-RGB projection for SDXL latents (ComfyUI's), for folders that fit none.
LATENT_RGB: LatentRGB = (
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    (0.1084, -0.0175, -0.0011),
)


def is_refiner(components: Components) -> bool:
    return bool(components.options.get("requires_aesthetics_score", False))


def _modules(components: Components) -> dict[str, Any]:
    """The constructor arguments of the three pipelines, less the scheduler (no watermark: outputs are the model's
    own pixels, as every other family's)."""
    return {
        "unet": components.unet,
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "text_encoder_2": components.text_encoder_2,
        "tokenizer_2": components.tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": bool(components.options.get("force_zeros_for_empty_prompt", True)),
        "add_watermarker": False,
    }


def _text_pipeline(components: Components) -> Any:
    import diffusers

    # The Img2Img class encodes prompts exactly as the text-to-image one and also accepts a refiner's components.
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        **_modules(components), scheduler=None, requires_aesthetics_score=is_refiner(components)
    )


_TEXT = TextPipelines(_text_pipeline)


class StableDiffusionXL:
    """The SDXL family (see sdserve_core.families.Family)."""

    name = "sdxl"
    pipeline_classes = frozenset(PIPELINE_CLASSES.values())
    latent_rgb = LATENT_RGB

    def traits(self, index: dict[str, Any], in_channels: int) -> Traits:
        return family_index.traits(self.name, index, in_channels)

    def pipeline(self, components: Components, task: Task, scheduler: Any) -> Any:
        """A new pipeline object over the shared components with this call's own scheduler."""
        import diffusers

        modules = _modules(components)
        if task is Task.GENERATE:
            pipe = diffusers.StableDiffusionXLPipeline(**modules, scheduler=scheduler)
        else:
            cls = diffusers.StableDiffusionXLImg2ImgPipeline
            if task is Task.INPAINT:
                cls = diffusers.StableDiffusionXLInpaintPipeline
            pipe = cls(**modules, scheduler=scheduler, requires_aesthetics_score=is_refiner(components))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(
        self, components: Components, inputs: PromptInputs, cfg: bool, device: torch.device | str
    ) -> PromptEmbeds:
        """diffusers' SDXL encode_prompt for one image: both encoders' penultimate hidden states (less `clip_skip`
        layers) side by side, and the second encoder's pooled output. An empty negative prompt is passed as None,
        as a direct diffusers call without one does: the model's `force_zeros_for_empty_prompt` then applies."""
        with torch.inference_mode():
            positive, negative, pooled, negative_pooled = _TEXT.get(components).encode_prompt(
                prompt=inputs.prompt,
                prompt_2=inputs.prompt_2 or None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=(inputs.negative_prompt or None) if cfg else None,
                negative_prompt_2=(inputs.negative_prompt_2 or None) if cfg else None,
                clip_skip=inputs.clip_skip or None,
            )
        if not cfg:
            negative = negative_pooled = None
        return PromptEmbeds(positive, negative, pooled, negative_pooled)

    def add_kwargs(self, components: Components, call: PipelineCall, kwargs: dict[str, Any]) -> None:
        """Pooled embeddings, micro-conditioning (aesthetic scores for refiners' Edit and Inpaint calls) and the
        hand-off fractions."""
        if call.embeds is not None:
            embeds = call.embeds.first() if "num_images_per_prompt" in kwargs else call.embeds
            kwargs["pooled_prompt_embeds"] = embeds.pooled
            kwargs["negative_pooled_prompt_embeds"] = embeds.negative_pooled
        cond = call.conditioning
        if cond is not None:
            sizes = ("original_size", "target_size", "negative_original_size", "negative_target_size")
            for name in sizes:
                if getattr(cond, name) is not None:
                    kwargs[name] = getattr(cond, name)
            kwargs["crops_coords_top_left"] = cond.crops_coords_top_left
            kwargs["negative_crops_coords_top_left"] = cond.negative_crops_coords_top_left
            if call.task is not Task.GENERATE:
                kwargs["aesthetic_score"] = cond.aesthetic_score
                kwargs["negative_aesthetic_score"] = cond.negative_aesthetic_score
        if call.denoising_end is not None:
            kwargs["denoising_end"] = call.denoising_end
        if call.denoising_start is not None:
            kwargs["denoising_start"] = call.denoising_start

    def decode(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """Decodes in float32 when the VAE is float16 and its config says force_upcast (SDXL's VAE overflows in
        float16), as the pipelines do."""
        return vae_decode(components, latents, upcast=bool(getattr(components.vae.config, "force_upcast", False)))


SDXL = StableDiffusionXL()
