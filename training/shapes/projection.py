"""Least-squares fit of the LATENT_RGB preview projection on the shapes dataset (sdserve_core.latent_rgb fits)."""

from __future__ import annotations

from diffusers import AutoencoderKL

from sdserve_core.latent_rgb import fit_latent_rgb as fit

from .data import render_dataset
from .tensors import to_tensor


def fit_latent_rgb(vae: AutoencoderKL, seed: int, n: int = 1024) -> dict[str, object]:
    """Fit rgb = latent @ factors + bias, latent being the scaled latents the pipelines denoise, on `n` images of the
    shapes dataset. The target is the VAE decode of the same latents, box-downsampled to the latent grid."""
    return fit(vae, to_tensor(render_dataset(seed, n)[0]), seed)
