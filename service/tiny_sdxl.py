"""Builds tiny SDXL-layout models (base, refiner, inpainting) from configs: random weights, the shape of diffusers'
own SDXL test components (two text encoders, pooled embeddings, size/crop micro-conditioning), small enough to run
on a CPU in tests and benchmarks. `channels` scales them up for the benchmark's SDXL-shaped model."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from sdserve_core import model_folder
from sdserve_core.components import CONSTRUCTION_LOCK
from sdserve_core.latent_rgb import fit_latent_rgb, smooth_images
from service.tiny import tiny_vae, write_tokenizer

Kind = Literal["base", "refiner", "inpaint"]
PIPELINE_CLASS = {
    "base": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
}
TIME_EMBED_DIM = 8
TEXT_HIDDEN = 32


def build_tiny_sdxl(
    folder: Path, seed: int = 0, kind: Kind = "base", channels: tuple[int, ...] = (32, 64), sample_size: int = 16
) -> Path:
    """Writes a tiny SDXL `kind` model (random weights from `seed`) to `folder`, atomically; an existing folder is
    kept. The native size is `sample_size` x 4 pixels (the VAE has three levels). The refiner has only the second
    text encoder and an aesthetic-score-conditioned UNet; the inpainting model's UNet takes 9 input channels."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        with CONSTRUCTION_LOCK:  # not while another thread's load patches module construction
            _write(tmp, seed, kind, channels, sample_size)
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "model_index.json").exists():
            raise
    return folder


def _write(tmp: Path, seed: int, kind: Kind, channels: tuple[int, ...], sample_size: int) -> None:
    refiner = kind == "refiner"
    unet = tiny_sdxl_unet(seed, kind, channels, sample_size)
    vae = tiny_sdxl_vae(seed + 1)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    if not refiner:
        tiny_text_encoder(seed + 2, projection=False).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        write_tokenizer(tmp / "tokenizer")
    tiny_text_encoder(seed + 3, projection=True).save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
    write_tokenizer(tmp / "tokenizer_2")
    sdxl_scheduler().save_pretrained(tmp / "scheduler")
    write_sdxl_index(tmp, kind)
    projection = fit_latent_rgb(vae, smooth_images(32, 64, seed), seed)
    model_folder.write_meta(
        tmp,
        {},
        description=f"Tiny random-weight SDXL {kind} model built locally; produces noise-like images.",
        default_steps=20,
        default_guidance_scale=5.0,
        latent_rgb={"factors": projection["factors"], "bias": projection["bias"]},
    )


def write_sdxl_index(folder: Path, kind: Kind) -> None:
    """An SDXL model_index.json: the refiner names no first text encoder or tokenizer, as Stability's does."""
    refiner = kind == "refiner"
    index: dict[str, Any] = {
        "_class_name": PIPELINE_CLASS[kind],
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_sdxl_unet(seed: int, kind: Kind, channels: tuple[int, ...] = (32, 64), sample_size: int = 16) -> Any:
    """An SDXL-style UNet (text-time additional embeddings, linear projections), random weights from `seed`."""
    from diffusers import UNet2DConditionModel

    refiner = kind == "refiner"
    # add_time_ids: original size (2) + crop (2) + target size (2), or + aesthetic score (1) for the refiner.
    time_ids = 5 if refiner else 6
    torch.manual_seed(seed)
    levels = len(channels)
    return UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=9 if kind == "inpaint" else 4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(2 * (i + 1) for i in range(levels)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=tuple(i + 1 for i in range(levels)),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + TEXT_HIDDEN,
        cross_attention_dim=TEXT_HIDDEN if refiner else 2 * TEXT_HIDDEN,
        norm_num_groups=min(32, channels[0]),
    )


def tiny_sdxl_vae(seed: int) -> Any:
    """The tiny VAE with SDXL's scaling factor and force_upcast (its real VAE overflows in float16)."""
    return tiny_vae(seed, scaling_factor=0.13025, force_upcast=True)


def tiny_text_encoder(seed: int, projection: bool) -> Any:
    """A five-layer CLIP text encoder over write_tokenizer's vocabulary; with `projection`, the second encoder's
    CLIPTextModelWithProjection (its pooled, projected output conditions the SDXL UNet)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=514,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def sdxl_scheduler() -> Any:
    """SDXL's scheduler configuration: Euler discrete, scaled-linear betas, leading timestep spacing."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
