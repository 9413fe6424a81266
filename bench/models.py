"""Builds the benchmark's random-weight models (SD 1.5 shape, small and full) once, in a cache folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from service.tiny import TINY_NAME, build_tiny, write_model_index, write_tokenizer

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
CACHE = Path.home() / ".cache" / "sdserve" / "bench-models"
SHAPES = "shapes"
SMALL = "sd15-small"
FULL = "sd15-random"

# SD 1.5's scheduler config (PNDM with PLMS steps only, as the released model ships it).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
}


def tiny_model() -> tuple[str, Path]:
    """The tiny model: the embedded trained `shapes` model when present, else `tiny-sd` built in the cache."""
    if (REPO_MODELS / SHAPES / "model_index.json").is_file():
        return SHAPES, REPO_MODELS
    build_tiny(CACHE / TINY_NAME, seed=0)
    return TINY_NAME, CACHE


def sd15_model(name: str, unet_channels: tuple[int, ...], size: int, seed: int = 0) -> tuple[str, Path]:
    """An SD 1.5-layout model with random weights (UNet widths `unet_channels`), built once into the cache."""
    folder = CACHE / name
    if (folder / "model_index.json").is_file():
        return name, CACHE
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=CACHE))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=size,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    # CLIP ViT-L/14's text tower, with the byte-level tokenizer's vocabulary (514 ids).
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    write_tokenizer(tmp / "tokenizer")
    PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(tmp / "scheduler")
    write_model_index(tmp, "StableDiffusionPipeline", "PNDMScheduler")
    meta = {
        "format": 1,
        "description": f"Random-weight SD 1.5-layout benchmark model (UNet widths {list(unet_channels)}).",
        "default_width": size,
        "default_height": size,
        "default_steps": 20,
        "default_guidance_scale": 7.5,
    }
    (tmp / "sdserve.json").write_text(json.dumps(meta, indent=2))
    try:
        tmp.rename(folder)
    except OSError:
        # Another process published it first; it is built from the same seed.
        shutil.rmtree(tmp, ignore_errors=True)
    return name, CACHE


def resolve_model(key: str) -> tuple[str, Path]:
    """(model name, folder holding it) for a --models key: tiny, small or sd15."""
    if key == "tiny":
        return tiny_model()
    if key == "small":
        return sd15_model(SMALL, (128, 256, 512, 512), 256)
    if key == "sd15":
        return sd15_model(FULL, (320, 640, 1280, 1280), 512)
    raise ValueError(f"unknown model key {key!r}; expected tiny, small or sd15")
