"""Conversions between uint8 images, masks and model tensors, and cached VAE encodings."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from numpy.typing import NDArray
from PIL import Image

from .data import Mask


def to_tensor(images: NDArray[np.uint8]) -> torch.Tensor:
    """N x 64 x 64 x 3 uint8 -> N x 3 x 64 x 64 float in [-1, 1] (the pipelines' normalisation)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """N x 3 x H x W float in [-1, 1] -> PIL images."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(i) for i in a]


def masks_to_tensor(masks: list[Mask]) -> torch.Tensor:
    """Boolean masks -> N x 1 x 64 x 64 float (1 = repaint)."""
    return torch.from_numpy(np.stack(masks)).float()[:, None]


def mask_latents(mask: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Downsample a pixel mask the way the inpainting pipeline does (nearest)."""
    return torch.nn.functional.interpolate(mask, size=(size, size))


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image (unscaled), computed in batches."""
    means, stds = [], []
    for i in range(0, len(x), batch):
        dist = vae.encode(x[i : i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
    """A fresh `latent_dist.sample()` from cached moments, times the scaling factor."""
    return (mean + std * torch.randn_like(std)) * scale


def invert_decoder(
    vae: AutoencoderKL, x: torch.Tensor, start: torch.Tensor, steps: int, lr: float, batch: int = 48
) -> torch.Tensor:
    """Latents (unscaled) that the decoder renders closer to x: from start (the posterior means), steps of Adam on
    the L1 distance between decode(z) and x. The encoder is lossy for colours it rarely saw: its means of a maroon
    scene decode as black or red in about a fifth of scenes, and a short inversion brings them back."""
    vae.requires_grad_(False)
    out = []
    for i in range(0, len(x), batch):
        z = start[i : i + batch].clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            loss = (vae.decode(z).sample - x[i : i + batch]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(z.detach())
    return torch.cat(out).contiguous()
