"""Stable Diffusion 1.x (and the SD 2.x layouts): a UNet2DConditionModel, one CLIP text encoder, an AutoencoderKL,
run by diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline."""

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
    Task.GENERATE: "StableDiffusionPipeline",
    Task.EDIT: "StableDiffusionImg2ImgPipeline",
    Task.INPAINT: "StableDiffusionInpaintPipeline",
}
# Published linear latent-to-RGB projection for SD 1.x latents (as used by A1111 and ComfyUI previews).
LATENT_RGB: LatentRGB = (
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    (0.0, 0.0, 0.0),
)
# PipelineCall fields that SD 1.x pipelines do not take.
SDXL_ONLY = ("conditioning", "denoising_start", "denoising_end")


def _modules(components: Components) -> dict[str, Any]:
    """The constructor arguments of the three pipelines, less the scheduler (no safety checker)."""
    return {
        "unet": components.unet,
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _text_pipeline(components: Components) -> Any:
    import diffusers

    return diffusers.StableDiffusionPipeline(**_modules(components), scheduler=None)


_TEXT = TextPipelines(_text_pipeline)


def skip_layers(components: Components, prompt: str, clip_skip: int, device: torch.device | str) -> torch.Tensor:
    """The prompt's embeddings from the text encoder's hidden state `clip_skip` layers before the last, through the
    final layer norm: what diffusers' `encode_prompt(clip_skip=...)` computes. Done here because diffusers 0.42
    reaches the norm through `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
    Like diffusers, only the prompt is skipped; the negative prompt uses the last layer."""
    encoder = components.text_encoder
    tokenizer = components.tokenizer
    assert encoder is not None and tokenizer is not None, "an SD 1.x model has a text encoder"
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    text_model: Any = getattr(encoder, "text_model", encoder)
    norm = text_model.final_layer_norm
    return norm(hidden).to(dtype=encoder.dtype, device=device)  # type: ignore[no-any-return]


def _pairs(components: Components, inputs: PromptInputs, cfg: bool) -> list[tuple[Encoder, str]]:
    """The (encoder, text) of the prompt and, with `cfg`, the negative prompt: the prompt `clip_skip` layers
    before the last through the final norm (skip_layers), the negative one from the last layer, as diffusers."""
    encoder, tokenizer = components.text_encoder, components.tokenizer
    assert encoder is not None and tokenizer is not None, "an SD 1.x model has a text encoder"
    skip = inputs.clip_skip
    positive = Encoder("text_encoder", encoder, tokenizer, -(skip + 1) if skip else None, final_norm=bool(skip))
    pairs = [(positive, inputs.prompt)]
    if cfg:
        pairs.append((Encoder("text_encoder", encoder, tokenizer), inputs.negative_prompt))
    return pairs


class StableDiffusion1:
    """The SD 1.x family (see sdserve_core.families.Family)."""

    name = "sd15"
    pipeline_classes = frozenset(PIPELINE_CLASSES.values())
    latent_rgb = LATENT_RGB

    def traits(self, index: dict[str, Any], in_channels: int) -> Traits:
        return family_index.traits(self.name, index, in_channels)

    def pipeline(self, components: Components, task: Task, scheduler: Any) -> Any:
        """A new pipeline object over the shared components with this call's own scheduler."""
        import diffusers

        cls = {
            Task.GENERATE: diffusers.StableDiffusionPipeline,
            Task.EDIT: diffusers.StableDiffusionImg2ImgPipeline,
            Task.INPAINT: diffusers.StableDiffusionInpaintPipeline,
        }[task]
        pipe = cls(**_modules(components), scheduler=scheduler)
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
        """One image's embeddings. Plain prompts that fit one chunk and name no embedding of `vocab` go through
        diffusers' encode_prompt (with `clip_skip` the prompt's embeddings come from skip_layers); any other goes
        through sdserve_core.weighted (A1111's syntax, chunks and textual inversion; docs/prompts.md). The
        negative prompt is encoded only with classifier-free guidance (`cfg`); otherwise it is None. The
        second-encoder prompts do not exist here (validation refuses them for this family)."""
        with torch.inference_mode():
            pairs = _pairs(components, inputs, cfg)
            if not weighted.is_simple(pairs, vocab):
                found = weighted.encode(pairs, vocab, device)
                dtype = pairs[0][0].module.dtype
                positive, *rest = (hidden.to(dtype=dtype, device=device) for hidden, _ in found)
                return PromptEmbeds(positive, rest[0] if rest else None)
            clip_skip = inputs.clip_skip
            skipped = skip_layers(components, inputs.prompt, clip_skip, device) if clip_skip else None
            positive, negative = _TEXT.get(components).encode_prompt(
                None if skipped is not None else inputs.prompt,
                device,
                1,
                cfg,
                inputs.negative_prompt if cfg else None,
                prompt_embeds=skipped,
            )
        return PromptEmbeds(positive, negative)

    def add_kwargs(self, components: Components, call: PipelineCall, kwargs: dict[str, Any]) -> None:
        """Nothing to add; SDXL's arguments are refused."""
        for name in SDXL_ONLY:
            if getattr(call, name) is not None:
                raise ValueError(f"{name} is for SDXL models; this is an SD 1.x model")
        if call.embeds is not None and call.embeds.pooled is not None:
            raise ValueError("pooled embeddings are for SDXL models; this is an SD 1.x model")

    def decode(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(components, latents, upcast=False)


SD15 = StableDiffusion1()
