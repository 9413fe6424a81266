"""Least-squares fit of the LATENT_RGB preview projection: one latent pixel's 4 values -> RGB in [-1, 1]."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from .data import render_dataset
from .tensors import to_tensor


@torch.no_grad()
def fit_latent_rgb(vae: AutoencoderKL, seed: int, n: int = 1024) -> dict[str, object]:
    """Fit rgb = latent @ factors + bias, latent being the scaled latents the pipelines denoise.

    The target is the VAE decode of the same latents, box-downsampled to the latent grid.
    """
    x = to_tensor(render_dataset(seed, n)[0])
    scale = float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    dist = vae.encode(x).latent_dist
    latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
    decoded = vae.decode(latents).sample.clamp(-1, 1)
    target = torch.nn.functional.avg_pool2d(decoded, vae.config.sample_size // latents.shape[-1])
    a = (latents * scale).permute(0, 2, 3, 1).reshape(-1, 4).double()
    b = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    solution = torch.linalg.lstsq(a1, b).solution
    rmse = float((a1 @ solution - b).pow(2).mean().sqrt())
    return {
        "factors": [[round(float(v), 6) for v in row] for row in solution[:4]],
        "bias": [round(float(v), 6) for v in solution[4]],
        "rmse": rmse,
    }
