"""Stage 1: train the AutoencoderKL on procedural renders (some with zeroed inpainting masks)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from .configs import new_vae
from .data import random_mask, render_dataset
from .loop import Budget, Progress, plain_step, recon_loss, seed_everything, set_lr
from .tensors import encode_moments, masks_to_tensor, to_tensor

log = logging.getLogger(__name__)

N_TRAIN = 8000
N_HELD_OUT = 256
BATCH = 16
LR = 2e-3
WARMUP = 100
P_MASKED = 0.25
KL_WEIGHT = 1e-6


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] image batches."""
    mse = float(((a - b) / 2).pow(2).mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@torch.no_grad()
def held_out_psnr(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """Reconstruction PSNR through a sampled latent, as the pipelines encode."""
    return psnr(vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1), x)


def train_vae(out: Path, seconds: float, seed: int, steps: int | None = None) -> dict[str, float]:
    """Train, set scaling_factor = 1 / std of sampled latents, save to out; return figures."""
    seed_everything(seed)
    images, scenes = render_dataset(seed, N_TRAIN)
    x_all = to_tensor(images)
    held_out = to_tensor(render_dataset(seed + 10_000, N_HELD_OUT)[0])
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    budget = Budget(seconds, WARMUP, steps)
    progress = Progress("vae")
    rng = random.Random(f"vae:{seed}")
    step = 0
    while not budget.done(step):
        idx = [rng.randrange(N_TRAIN) for _ in range(BATCH)]
        x = x_all[idx]
        masked = [i for i, j in enumerate(idx) if rng.random() < P_MASKED]
        if masked:
            m = masks_to_tensor([random_mask(scenes[idx[i]], rng) for i in masked])
            x[masked] = x[masked] * (1 - m)
        set_lr(opt, LR, budget.factor(step))
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        rec_loss, l1 = recon_loss(rec, x)
        loss = rec_loss + KL_WEIGHT * dist.kl().mean()
        plain_step(loss, opt)
        progress.step(step, loss=loss.item(), l1=l1.item())
        step += 1
    vae.eval()
    mean, std = encode_moments(vae, x_all[:2048])
    sampled_std = float((mean + std * torch.randn_like(std)).std())
    vae.register_to_config(scaling_factor=1.0 / sampled_std)
    figures = {"steps": step, "seconds": budget.elapsed(), "held_out_psnr_db": held_out_psnr(vae, held_out)}
    figures["scaling_factor"] = 1.0 / sampled_std
    progress.step(step, force=True, **figures)
    vae.save_pretrained(str(out), safe_serialization=True)
    return figures
