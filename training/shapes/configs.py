"""Architectures and noise schedules of the shapes models (SD 1.x component classes, tiny sizes)."""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer import MAX_LENGTH

_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "clip_sample": False,
}


def new_vae() -> AutoencoderKL:
    """64x64 RGB <-> 16x16x4 latents: three blocks (16, 32, 64 channels)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def new_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text encoder with 77 positions."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=64,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def new_unet(in_channels: int = 4) -> UNet2DConditionModel:
    """16x16 latents, channels (64, 128), cross-attention only at 8x8 (about 3.9M parameters)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def train_scheduler() -> DDPMScheduler:
    """The training noise schedule (SD scaled_linear betas)."""
    return DDPMScheduler(**_BETAS)


def inference_scheduler() -> DDIMScheduler:
    """The shipped sampling scheduler (DDIM with SD 1.x settings)."""
    return DDIMScheduler(**_BETAS, set_alpha_to_one=False)
