"""Architectures and noise schedules of the shapes models (SD 1.x component classes, tiny sizes)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer import MAX_LENGTH

# Stage 2 trains on SD 1.x's scaled-linear betas; everything after it, and sampling, on the same betas
# rescaled to zero terminal SNR (see shipped_betas).
_SD_BETAS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "steps_offset": 1,
    "clip_sample": False,
}


# The rescale makes alphas_cumprod reach 0 at t = 999; it is floored at 1e-4 (reached from t = 980 on). The
# UNet still sees pure noise at t = 999 (1% signal at most at the floor), and the first sigma,
# sqrt((1 - a) / a), is 100 rather than 4096: at 2^-24 (sigma 4096, what diffusers' own rescale option
# uses) HEUN drew 12.5% of backgrounds right and DPMPP_2M_KARRAS 83%; at 1e-4 100% both, DDIM unchanged
# (`python -m quality --n 24`). PNDM and LMS stay poor on this schedule either way.
TERMINAL_ALPHA_BAR = 1e-4


def shipped_betas() -> list[float]:
    """SD's scaled-linear betas rescaled to (almost) zero terminal SNR (Lin et al. 2023).

    With the plain schedule a t = 999 training input still holds 6.8% of the image, so the UNet learns
    to take the layout (where the shape is, what an inpainting mask keeps) from that residue; sampling
    starts from pure noise, and the layout then follows the noise instead of the prompt or the mask.
    Stored as `trained_betas`, which every diffusers scheduler the service offers accepts, unlike the
    `rescale_betas_zero_snr` flag.
    """
    betas = rescale_zero_terminal_snr(DDPMScheduler(**_SD_BETAS).betas).double()
    alphas_cumprod = torch.cumprod(1 - betas, 0).clamp(min=TERMINAL_ALPHA_BAR)
    ratios = alphas_cumprod[1:] / alphas_cumprod[:-1]
    return [float(b) for b in torch.cat([1 - alphas_cumprod[:1], 1 - ratios])]


_SHIPPED: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "trained_betas": shipped_betas(),
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
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
    """A 2-layer, 64-wide CLIP text encoder with MAX_LENGTH positions."""
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


def new_unet(in_channels: int = 4, **overrides: Any) -> UNet2DConditionModel:
    """16x16 latents, channels (64, 128), cross-attention only at 8x8 (about 3.9M parameters); overrides
    change the UNet2DConditionModel arguments (the recipe sweep's architecture variants)."""
    config: dict[str, Any] = {
        "sample_size": 16,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
    }
    return UNet2DConditionModel(**{**config, **overrides})


def sd_scheduler() -> DDPMScheduler:
    """Stage 2's training noise schedule: SD 1.x scaled-linear betas, v-prediction."""
    return DDPMScheduler(**_SD_BETAS)


def train_scheduler() -> DDPMScheduler:
    """The noise schedule the shipped UNets are fine-tuned on and sample with (zero terminal SNR)."""
    return DDPMScheduler(**_SHIPPED)


def inference_scheduler() -> DDIMScheduler:
    """The shipped sampling scheduler: DDIM, trailing timesteps (the first step is t = 999)."""
    return DDIMScheduler(**_SHIPPED, set_alpha_to_one=False)
