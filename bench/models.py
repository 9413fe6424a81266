"""Builds the benchmark's random-weight models (SD 1.5 shape, small and full; SDXL shape, reduced) once, in a cache
folder."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from sdserve_core import model_folder
from sdserve_core.latent_rgb import fit_latent_rgb, smooth_images
from service.tiny import TINY_NAME, build_tiny, write_model_index, write_tokenizer
from service.tiny_sdxl import sdxl_scheduler, write_sdxl_index

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
CACHE = Path.home() / ".cache" / "sdserve" / "bench-models"
SHAPES = "shapes"
SMALL = "sd15-small"
FULL = "sd15-random"
SDXL_SMALL = "sdxl-small"

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
    _publish(tmp, folder)
    return name, CACHE


def _publish(tmp: Path, folder: Path) -> None:
    try:
        tmp.rename(folder)
    except OSError:
        # Another process published it first; it is built from the same seed.
        shutil.rmtree(tmp, ignore_errors=True)


def sdxl_model(
    name: str,
    unet_channels: tuple[int, int, int],
    transformer_layers: tuple[int, int, int],
    vae_channels: tuple[int, ...],
    text_2_layers: int,
    size: int,
    seed: int = 0,
    cache: Path = CACHE,
) -> tuple[str, Path]:
    """An SDXL-layout base model with random weights, built once into `cache` (see bench/README.md for the shape).

    What the UNet sees keeps SDXL's sizes: 2048-wide token embeddings (768 + 1280 from the two encoders), a
    1280-wide pooled embedding, six 256-wide micro-conditioning embeddings. The UNet's widths, the second
    encoder's depth and the VAE's widths are reduced. `size` is the native size: the VAE has four levels (8x).
    """
    folder = cache / name
    if (folder / "model_index.json").is_file():
        return name, cache
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=2,
        # SDXL drops attention at the highest resolution and puts most transformer layers at the lowest.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        # Heads of 64 channels, as SDXL's (its config's attention_head_dim is the head count).
        attention_head_dim=tuple(max(1, c // 64) for c in unet_channels),
        use_linear_projection=True,
        cross_attention_dim=768 + 1280,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        # Six time ids (original size, crop, target size) of 256 each, plus the pooled text embedding.
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=min(32, vae_channels[0]),
        sample_size=size,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    # The byte-level tokenizer's vocabulary (514 ids) for both encoders.
    vocab = {"vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
    torch.manual_seed(seed + 2)
    # CLIP ViT-L/14's text tower.
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **vocab,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )
    torch.manual_seed(seed + 3)
    # OpenCLIP ViT-bigG/14's text tower at full width, fewer layers (it has 32).
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **vocab,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=text_2_layers,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        )
    )
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
    write_tokenizer(tmp / "tokenizer")
    write_tokenizer(tmp / "tokenizer_2")
    sdxl_scheduler().save_pretrained(tmp / "scheduler")
    write_sdxl_index(tmp, "base")
    with torch.inference_mode():
        projection = fit_latent_rgb(vae, smooth_images(32, 64, seed), seed)
    model_folder.write_meta(
        tmp,
        {},
        description=f"Random-weight SDXL-layout benchmark model (UNet widths {list(unet_channels)}).",
        default_width=size,
        default_height=size,
        default_steps=20,
        default_guidance_scale=5.0,
        latent_rgb={"factors": projection["factors"], "bias": projection["bias"]},
    )
    _publish(tmp, folder)
    return name, cache


def resolve_model(key: str) -> tuple[str, Path]:
    """(model name, folder holding it) for a --models key: tiny, small, sd15 or sdxl."""
    if key == "tiny":
        return tiny_model()
    if key == "small":
        return sd15_model(SMALL, (128, 256, 512, 512), 256)
    if key == "sd15":
        return sd15_model(FULL, (320, 640, 1280, 1280), 512)
    if key == "sdxl":
        return sdxl_model(SDXL_SMALL, (64, 128, 256), (1, 2, 10), (32, 64, 128, 128), 8, 512)
    raise ValueError(f"unknown model key {key!r}; expected tiny, small, sd15 or sdxl")
