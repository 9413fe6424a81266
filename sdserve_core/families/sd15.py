"""Stable Diffusion 1.x (and the SD 2.x layouts): a UNet2DConditionModel, one CLIP text encoder, an AutoencoderKL,
run by diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from sdserve_core.components import Components
from sdserve_core.tasks import Task

PIPELINE_CLASSES = {
    Task.GENERATE: "StableDiffusionPipeline",
    Task.EDIT: "StableDiffusionImg2ImgPipeline",
    Task.INPAINT: "StableDiffusionInpaintPipeline",
}


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


# One scheduler-less pipeline per Components for prompt encoding (encode_prompt is the same method in all three
# pipelines); it goes when the Components does.
_TEXT_PIPELINES: weakref.WeakKeyDictionary[Components, Any] = weakref.WeakKeyDictionary()
_TEXT_LOCK = threading.Lock()


def _text_pipeline(components: Components) -> Any:
    with _TEXT_LOCK:
        pipe = _TEXT_PIPELINES.get(components)
        if pipe is None:
            import diffusers

            pipe = diffusers.StableDiffusionPipeline(**_modules(components), scheduler=None)
            _TEXT_PIPELINES[components] = pipe
        return pipe


def skip_layers(components: Components, prompt: str, clip_skip: int, device: torch.device | str) -> torch.Tensor:
    """The prompt's embeddings from the text encoder's hidden state `clip_skip` layers before the last, through the
    final layer norm: what diffusers' `encode_prompt(clip_skip=...)` computes. Done here because diffusers 0.42
    reaches the norm through `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
    Like diffusers, only the prompt is skipped; the negative prompt uses the last layer."""
    encoder = components.text_encoder
    tokenizer = components.tokenizer
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


class StableDiffusion1:
    """The SD 1.x family (see sdserve_core.families.Family)."""

    name = "sd15"
    pipeline_classes = frozenset(PIPELINE_CLASSES.values())

    def tasks(self, in_channels: int) -> tuple[Task, ...]:
        """An inpainting UNet (9 input channels) only inpaints; a plain one runs every task."""
        if in_channels == 9:
            return (Task.INPAINT,)
        return (Task.GENERATE, Task.EDIT, Task.INPAINT)

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
        prompt: str,
        negative_prompt: str,
        clip_skip: int,
        cfg: bool,
        device: torch.device | str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' encode_prompt for one image; with `clip_skip` the prompt's embeddings come from skip_layers.
        The negative prompt is encoded only with classifier-free guidance (`cfg`); otherwise it is None."""
        with torch.inference_mode():
            skipped = skip_layers(components, prompt, clip_skip, device) if clip_skip else None
            positive, negative = _text_pipeline(components).encode_prompt(
                None if skipped is not None else prompt,
                device,
                1,
                cfg,
                negative_prompt if cfg else None,
                prompt_embeds=skipped,
            )
        return positive, negative


SD15 = StableDiffusion1()
