"""A model's loaded components (typed, by name) and the one loader that puts them on a device.

The server (service/models.py) and the sidecar's quality render (model_manager/quality.py) load through
`load_components`, so both run exactly the same weights in exactly the same way. diffusers and transformers are
untyped here (mypy skips them); the small protocols below name what sdserve itself reads of each component, and
everything else goes to the diffusers pipeline as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import torch


class Module(Protocol):
    """A loaded diffusers or transformers model (UNet2DConditionModel, CLIPTextModel, int8 variants of them)."""

    @property
    def config(self) -> Any: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class Autoencoder(Module, Protocol):
    """The VAE (AutoencoderKL): previews decode latents with it."""

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> Any: ...


class Tokenizer(Protocol):
    """The text encoder's tokenizer (CLIPTokenizer)."""

    @property
    def model_max_length(self) -> int: ...

    def __call__(self, text: str | list[str], **kwargs: Any) -> Any: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """One model's weights on a device, shared by every pipeline that runs it (compared and hashed by identity:
    one Components is one load). `family` names its sdserve_core.families entry, which knows how to run it."""

    family: str
    unet: Module
    vae: Autoencoder
    text_encoder: Module
    tokenizer: Tokenizer

    @property
    def in_channels(self) -> int:
        """The denoiser's input channels (9 for inpainting UNets: latents, mask and masked-image latents)."""
        return int(self.unet.config.in_channels)


def component_classes() -> tuple[Any, Any, Any, Any]:
    """The UNet, VAE, text encoder and tokenizer classes (imported on first use: importing them takes seconds,
    which callers that time a load do before they start the clock)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer


def load_components(folder: Path, variant: str, dtype: torch.dtype, device: torch.device | str) -> Components:
    """Loads a diffusers folder's components (safetensors only) in `dtype` onto `device`, in eval mode and without
    gradients. The int8 variant keeps its UNet and text encoder weights int8 (sdserve_core.quant); `dtype` is then
    the compute dtype of everything else. The family comes from the folder's model_index.json."""
    from sdserve_core.families import family_of
    from sdserve_core.quant import load_int8_component

    UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer = component_classes()
    family = family_of(folder)
    common: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
    if variant == "int8":
        unet = load_int8_component(UNet2DConditionModel, folder, "unet", dtype, device)
        text_encoder = load_int8_component(CLIPTextModel, folder, "text_encoder", dtype, device)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **common)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **common)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    for module in (unet, vae, text_encoder):
        module.to(device)
        module.eval()
        module.requires_grad_(False)
    return Components(family=family.name, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
