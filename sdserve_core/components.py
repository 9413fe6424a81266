"""A model's loaded components (typed, by name) and the one loader that puts them on a device.

The server (service/models.py) and the sidecar's quality render (model_manager/quality.py) load through
`load_components`, so both run exactly the same weights in exactly the same way. diffusers and transformers are
untyped here (mypy skips them); the small protocols below name what sdserve itself reads of each component, and
everything else goes to the diffusers pipeline as it is.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from sdserve_core import model_folder


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
    one Components is one load). `family` names its sdserve_core.families entry, which knows how to run it.

    SD 1.x has one text encoder; SDXL has two (`text_encoder_2` gives the pooled embedding), and an SDXL refiner
    only the second. `options` are the pipeline's registered options from model_index.json (SDXL's
    `force_zeros_for_empty_prompt` and `requires_aesthetics_score`)."""

    family: str
    unet: Module
    vae: Autoencoder
    text_encoder: Module | None
    tokenizer: Tokenizer | None
    text_encoder_2: Module | None = None
    tokenizer_2: Tokenizer | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        """The denoiser's input channels (9 for inpainting UNets: latents, mask and masked-image latents)."""
        return int(self.unet.config.in_channels)

    def modules(self) -> tuple[Module, ...]:
        """The loaded torch modules (UNet, VAE and the text encoders present)."""
        present = (self.unet, self.vae, self.text_encoder, self.text_encoder_2)
        return tuple(m for m in present if m is not None)


def component_classes() -> tuple[Any, Any, Any, Any]:
    """The UNet, VAE, text encoder and tokenizer classes (imported on first use: importing them takes seconds,
    which callers that time a load do before they start the clock)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer


# model_index.json's pipeline options that the pipelines take as constructor arguments.
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


# Held while torch modules are built in this process. diffusers' and transformers' from_pretrained patch
# process-wide state for the length of a load: torch.nn.init's functions are replaced with no-ops,
# nn.Module.register_parameter puts new parameters on the meta device (accelerate's init_empty_weights), and the
# default dtype is switched to the load's. A module built on another thread meanwhile (a LoRA's layers injected on
# the device worker while a hot swap loads beside serving, the tiny fallback model being written) would get
# uninitialised or meta weights ("Cannot copy out of meta tensor"). Loads and such construction take this lock.
CONSTRUCTION_LOCK = threading.RLock()


def load_components(folder: Path, variant: str, dtype: torch.dtype, device: torch.device | str) -> Components:
    """Loads a diffusers folder's components (safetensors only) in `dtype` onto `device`, in eval mode and without
    gradients. The int8 variant keeps its UNet and text encoder weights int8 (sdserve_core.quant); `dtype` is then
    the compute dtype of everything else. The family comes from the folder's model_index.json; the text encoders
    are those it names. In float16, sdserve.json's `vae_fp16` subfolder (a VAE safe in float16) replaces vae/.
    Holds CONSTRUCTION_LOCK throughout."""
    with CONSTRUCTION_LOCK:
        return _load_components(folder, variant, dtype, device)


def _load_components(folder: Path, variant: str, dtype: torch.dtype, device: torch.device | str) -> Components:
    from sdserve_core.families import family_of

    UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer = component_classes()
    family = family_of(folder)
    index = model_folder.read_json(folder / model_folder.MODEL_INDEX)
    named = model_folder.named_components(index)
    meta = model_folder.read_meta(folder)
    common: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
    unet = _load(UNet2DConditionModel, folder, "unet", variant, dtype, device)
    vae_folder = meta.vae_fp16 if dtype == torch.float16 and meta.vae_fp16 else "vae"
    vae = AutoencoderKL.from_pretrained(folder, subfolder=vae_folder, **common)
    text_encoder = tokenizer = text_encoder_2 = tokenizer_2 = None
    if "text_encoder" in named or "text_encoder_2" not in named:
        text_encoder = _load(CLIPTextModel, folder, "text_encoder", variant, dtype, device)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    if "text_encoder_2" in named:
        from transformers import CLIPTextModelWithProjection

        text_encoder_2 = _load(CLIPTextModelWithProjection, folder, "text_encoder_2", variant, dtype, device)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.to(device)
            module.eval()
            module.requires_grad_(False)
    return Components(
        family=family.name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        options={k: index[k] for k in PIPELINE_OPTIONS if k in index},
    )


def _load(cls: Any, folder: Path, sub: str, variant: str, dtype: torch.dtype, device: torch.device | str) -> Any:
    """One UNet or text encoder: int8 weights kept int8 for the int8 variant, else loaded in `dtype`."""
    if variant == "int8":
        from sdserve_core.quant import load_int8_component

        return load_int8_component(cls, folder, sub, dtype, device)
    return cls.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
