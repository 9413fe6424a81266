"""SDXL: a UNet with text-time additional embeddings, two CLIP text encoders (the second's pooled, projected
output conditions the UNet), an AutoencoderKL that overflows in float16 (force_upcast), run by diffusers'
StableDiffusionXL(Img2Img|Inpaint)Pipeline. A refiner folder has only the second text encoder and a UNet
conditioned on an aesthetic score (model_index.json's `requires_aesthetics_score`); it runs Edit and Inpaint, and
takes over from a base model part-way through the schedule (denoising_start) or refines its decoded image."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sdserve_core import family_index, weighted
from sdserve_core.components import Components
from sdserve_core.families.base import TextPipelines, vae_decode
from sdserve_core.family_index import Traits
from sdserve_core.model_folder import LatentRGB
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.tasks import Task
from sdserve_core.weighted import Encoder, TokenEmbedding

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


def _encoders(components: Components, hidden: int) -> list[Encoder]:
    """The text encoders diffusers' SDXL encode_prompt uses (a refiner has only the second), at hidden state
    `hidden`, without the final norm (as diffusers)."""
    found = []
    if components.text_encoder is not None:
        found.append(Encoder("text_encoder", components.text_encoder, components.tokenizer, hidden))
    found.append(Encoder("text_encoder_2", components.text_encoder_2, components.tokenizer_2, hidden))
    return found


def _pairs(
    components: Components, inputs: PromptInputs, cfg: bool
) -> tuple[list[tuple[Encoder, str]], list[tuple[Encoder, str]]]:
    """(encoder, text) of the prompt and of the negative prompt, paired as diffusers pairs them: `prompt_2` (or
    the prompt) for the second encoder, a refiner's only encoder gets the prompt; `clip_skip` for the prompt
    only. No negative pairs without `cfg` or when an empty negative prompt is zeroed
    (`force_zeros_for_empty_prompt`)."""
    positive_texts = (inputs.prompt, inputs.prompt_2 or inputs.prompt)
    positive = list(zip(_encoders(components, -(inputs.clip_skip + 2)), positive_texts, strict=False))
    zeroed = not inputs.negative_prompt and bool(components.options.get("force_zeros_for_empty_prompt", True))
    if not cfg or zeroed:
        return positive, []
    negative_texts = (inputs.negative_prompt, inputs.negative_prompt_2 or inputs.negative_prompt)
    return positive, list(zip(_encoders(components, -2), negative_texts, strict=False))


def _weighted(
    components: Components,
    positive_pairs: list[tuple[Encoder, str]],
    negative_pairs: list[tuple[Encoder, str]],
    cfg: bool,
    device: torch.device | str,
    vocab: Mapping[str, TokenEmbedding] | None,
) -> PromptEmbeds:
    """sdserve_core.weighted's embeddings: each encoder's chunks side by side (feature axis), the pooled
    embedding the second encoder's for the first chunk; zeros for a zeroed negative prompt, as diffusers."""
    found = weighted.encode(positive_pairs + negative_pairs, vocab, device)
    dtype = positive_pairs[-1][0].module.dtype

    def joined(part: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([h for h, _ in part], dim=-1).to(dtype=dtype, device=device)
        pooled = part[-1][1]
        assert pooled is not None, "the second SDXL text encoder has a pooled output"
        return hidden, pooled.to(dtype=dtype, device=device)

    positive, pooled = joined(found[: len(positive_pairs)])
    if not cfg:
        return PromptEmbeds(positive, None, pooled, None)
    if not negative_pairs:
        return PromptEmbeds(positive, torch.zeros_like(positive), pooled, torch.zeros_like(pooled))
    negative, negative_pooled = joined(found[len(positive_pairs) :])
    return PromptEmbeds(positive, negative, pooled, negative_pooled)


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
        self,
        components: Components,
        inputs: PromptInputs,
        cfg: bool,
        device: torch.device | str,
        *,
        vocab: Mapping[str, TokenEmbedding] | None = None,
    ) -> PromptEmbeds:
        """diffusers' SDXL encode_prompt for one image: both encoders' penultimate hidden states (less `clip_skip`
        layers) side by side, and the second encoder's pooled output. An empty negative prompt is passed as None,
        as a direct diffusers call without one does: the model's `force_zeros_for_empty_prompt` then applies.
        Prompts with A1111 syntax, more than one chunk or an embedding of `vocab` go through _weighted instead."""
        with torch.inference_mode():
            positive_pairs, negative_pairs = _pairs(components, inputs, cfg)
            if not weighted.is_simple(positive_pairs + negative_pairs, vocab):
                return _weighted(components, positive_pairs, negative_pairs, cfg, device, vocab)
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
