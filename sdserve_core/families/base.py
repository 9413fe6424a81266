"""What every family shares: text-pipeline caching and VAE decoding."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sdserve_core.components import Components


class TextPipelines:
    """One scheduler-less pipeline per Components for prompt encoding (diffusers' encode_prompt is a pipeline
    method); it goes when the Components does."""

    def __init__(self, build: Callable[[Components], Any]):
        self._build = build
        self._pipes: weakref.WeakKeyDictionary[Components, Any] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, components: Components) -> Any:
        with self._lock:
            pipe = self._pipes.get(components)
            if pipe is None:
                pipe = self._build(components)
                self._pipes[components] = pipe
            return pipe


def vae_decode(components: Components, latents: torch.Tensor, upcast: bool) -> torch.Tensor:
    """Pixels in [-1, 1] of scaled `latents`; with `upcast`, a float16 VAE decodes in float32 (as diffusers' SDXL
    pipelines do when the VAE's config says force_upcast) and is put back in float16 afterwards."""
    vae: Any = components.vae
    config = vae.config
    to_fp32 = upcast and vae.dtype == torch.float16
    if to_fp32:
        vae.to(torch.float32)
    try:
        dtype = vae.dtype
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            channels = latents.shape[1]
            m = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, dtype)
            s = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, dtype)
            scaled = latents.to(dtype) * s / config.scaling_factor + m
        else:
            scaled = latents.to(dtype) / config.scaling_factor
        with torch.inference_mode():
            return vae.decode(scaled, return_dict=False)[0].float()  # type: ignore[no-any-return]
    finally:
        if to_fp32:
            vae.to(torch.float16)
