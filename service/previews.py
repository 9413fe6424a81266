"""Preview images from in-progress latents: a linear latent-to-RGB projection or a full VAE decode."""

from __future__ import annotations

import torch
from PIL import Image

from sdserve_core import families
from service import imaging
from service.models import LoadedModel
from service.requests import PreviewImage, PreviewMode, PreviewSpec

DEFAULT_MAX_EDGE = 256


def latent_rgb(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Projects latents [N, 4, h, w] to RGB with the model's 4x3 factors and bias."""
    lat = latents.detach().to("cpu", torch.float32)
    rgb = torch.einsum("nchw,cr->nhwr", lat, model.latent_rgb_factors) + model.latent_rgb_bias
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def full_vae(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Decodes latents with the model's VAE as its family's pipelines do (SDXL: in float32 when a float16 VAE says
    force_upcast): exact colours, one decoder pass per preview."""
    decoded = families.get(model.components.family).decode(model.components, latents)
    arr = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def render(model: LoadedModel, latents: torch.Tensor, spec: PreviewSpec, output_edge: int) -> tuple[PreviewImage, ...]:
    """Encoded previews of each image in `latents`, scaled to the requested longest edge (by default the
    output's longest edge, at most DEFAULT_MAX_EDGE: a preview is never larger than the image it previews)."""
    edge = spec.max_edge or min(DEFAULT_MAX_EDGE, output_edge)
    images = latent_rgb(model, latents) if spec.mode is PreviewMode.LATENT_RGB else full_vae(model, latents)
    out = []
    for idx, img in enumerate(images):
        img = imaging.fit_edge(img, edge)
        data = imaging.encode_image(img, spec.format, spec.quality)
        out.append(PreviewImage(index=idx, data=data, format=spec.format, width=img.width, height=img.height))
    return tuple(out)
