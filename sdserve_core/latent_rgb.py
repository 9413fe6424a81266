"""Fits the LATENT_RGB preview projection of a VAE by least squares: one latent pixel's channels -> RGB in [-1, 1].

Any family's latent space gets its projection the same way (SD 1.x, SDXL, and the shapes models trained here):
encode images, decode the sampled latents, box-downsample the decode to the latent grid, and solve
rgb = latent @ factors + bias over every latent pixel. The result is stored in the folder's sdserve.json
(`latent_rgb`), which the server reads for previews.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def fit_latent_rgb(vae: Any, images: torch.Tensor, seed: int) -> dict[str, Any]:
    """The projection for `vae` fitted on `images` ([N, 3, H, W] in [-1, 1], H and W multiples of the VAE's
    scale factor), latents sampled with `seed`: {"factors": one RGB row per latent channel, "bias": RGB,
    "rmse": the fit's error in [-1, 1] units}. `factors` apply to the scaled latents the pipelines denoise."""
    images = images.to(torch.float32)
    vae = vae.to(torch.float32)
    scale = float(vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    dist = vae.encode(images).latent_dist
    latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
    decoded = vae.decode(latents).sample.clamp(-1, 1)
    target = torch.nn.functional.avg_pool2d(decoded, decoded.shape[-1] // latents.shape[-1])
    channels = latents.shape[1]
    a = (latents * scale).permute(0, 2, 3, 1).reshape(-1, channels).double()
    b = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    solution = torch.linalg.lstsq(a1, b).solution
    rmse = float((a1 @ solution - b).pow(2).mean().sqrt())
    return {
        "factors": [[round(float(v), 6) for v in row] for row in solution[:channels]],
        "bias": [round(float(v), 6) for v in solution[channels]],
        "rmse": rmse,
    }


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` random smooth colour images [count, 3, size, size] in [-1, 1] (bilinear-upsampled 4x4 noise): a
    probe set for fitting a projection when no dataset is at hand."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
