"""Writes SDXL diffusers weights back in Stability's original single-file (SGM) layout, for import tests.

The inverse of diffusers' single-file conversion (diffusers.loaders.single_file_utils): the UNet under
model.diffusion_model.* (LDM block names, the text-time embedding as label_emb.0), the VAE under first_stage_model.*,
CLIP ViT-L under conditioner.embedders.0.transformer.text_model.* (Hugging Face's layout) and OpenCLIP ViT-bigG under
conditioner.embedders.1.model.* (open_clip's layout: fused in_proj, resblocks, ln_final, text_projection), or, for the
refiner, OpenCLIP ViT-bigG alone under conditioner.embedders.0.model.*.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tests.model_manager import ldm

CLIP = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_BASE = "conditioner.embedders.1.model."
OPEN_CLIP_REFINER = "conditioner.embedders.0.model."
_LABEL_EMB = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_sgm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Diffusers SDXL UNet keys -> model.diffusion_model.* keys (add_embedding becomes label_emb.0)."""
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in _LABEL_EMB:
            out[f"{ldm.UNET}{_LABEL_EMB[module]}.{leaf}"] = value
        else:
            rest[key] = value
    out.update(ldm.unet_to_ldm(rest, dict(config)))
    return out


def clip_to_sgm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys (with or without transformers 5's missing `text_model.` prefix) -> embedders.0 keys."""
    return {CLIP + key.removeprefix("text_model."): value for key, value in sd.items()}


def open_clip_to_sgm(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection keys -> open_clip keys under `prefix` (text_projection transposed, as open_clip
    keeps it: width x embedding), plus the logit scale open_clip checkpoints carry and diffusers ignores."""
    bare = {k.removeprefix("text_model."): v for k, v in sd.items() if k != "text_projection.weight"}
    out = {prefix + k.removeprefix(ldm.OPEN_CLIP): v for k, v in ldm.open_clip_to_ldm(bare).items()}
    projection = sd["text_projection.weight"]
    out[prefix + "text_projection"] = projection.T.contiguous()
    out[prefix + "logit_scale"] = torch.ones((), dtype=projection.dtype, device=projection.device)
    return out


def sgm_state(
    unet: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]],
    vae: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]],
    clip: Mapping[str, torch.Tensor] | None,
    open_clip: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A whole SGM checkpoint from (state, config) of the UNet and VAE and the text encoders' states; without
    `clip` it is a refiner's (OpenCLIP at embedders.0)."""
    state = unet_to_sgm(*unet)
    state.update(ldm.vae_to_ldm(dict(vae[0]), dict(vae[1])))
    if clip is not None:
        state.update(clip_to_sgm(clip))
    state.update(open_clip_to_sgm(open_clip, OPEN_CLIP_REFINER if clip is None else OPEN_CLIP_BASE))
    return state


def write_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the SDXL diffusers model in `folder` (base, refiner or inpainting) as one SGM-layout .safetensors
    checkpoint at `out`."""
    from safetensors.torch import load_file, save_file

    def config(sub: str) -> dict[str, Any]:
        return dict(json.loads((folder / sub / "config.json").read_text()))

    index = json.loads((folder / "model_index.json").read_text())
    refiner = index.get("text_encoder", [None, None])[0] is None
    state = sgm_state(
        (load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), config("unet")),
        (load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), config("vae")),
        None if refiner else load_file(folder / "text_encoder" / "model.safetensors"),
        load_file(folder / "text_encoder_2" / "model.safetensors"),
    )
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
