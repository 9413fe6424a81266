"""Writes diffusers weights back in the original Stable Diffusion (LDM) single-file layout, for import tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPEN_CLIP = "cond_stage_model.model."


def _resnet(rest: str) -> str:
    for new, old in (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ):
        rest = rest.replace(new, old)
    return rest


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, object]) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel keys -> model.diffusion_model.* keys."""
    per = int(config["layers_per_block"]) + 1  # type: ignore[call-overload]
    up_types = list(config["up_block_types"])  # type: ignore[call-overload]
    out: dict[str, str] = {}
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for key in sd:
        module, _, leaf = key.rpartition(".")
        if module in fixed:
            out[key] = f"{fixed[module]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            out[key] = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[key] = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"middle_block.{0 if m[1] == '0' else 2}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[key] = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            out[key] = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            index = 2 if "CrossAttn" in up_types[int(m[1])] else 1
            out[key] = f"output_blocks.{int(m[1]) * per + per - 1}.{index}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return {UNET + ldm: sd[key] for key, ldm in out.items()}


def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict[str, object]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys -> first_stage_model.* keys (attention projections as 1x1 convolutions)."""
    n = len(config["up_block_types"])  # type: ignore[arg-type]
    out: dict[str, torch.Tensor] = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        ldm = key.replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            ldm = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            ldm = f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            ldm = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            ldm = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out[VAE + ldm] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (flattened, transformers 5) -> cond_stage_model.transformer.text_model.*."""
    return {CLIP + key: value for key, value in sd.items()}


def open_clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys of an SD 2.x text encoder -> OpenCLIP cond_stage_model.model.* keys."""
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in fixed:
            out[OPEN_CLIP + fixed[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if not m:
            continue  # position_ids buffers
        block, rest = f"{OPEN_CLIP}transformer.resblocks.{m[1]}.", m[2]
        if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            qkv.setdefault(f"{block}attn.in_proj_{q[2]}", {})[q[1]] = value
            continue
        rest = (
            rest.replace("self_attn.out_proj", "attn.out_proj")
            .replace("layer_norm1", "ln_1")
            .replace("layer_norm2", "ln_2")
            .replace("mlp.fc1", "mlp.c_fc")
            .replace("mlp.fc2", "mlp.c_proj")
        )
        out[block + rest] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def write_checkpoint(folder: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the diffusers model in `folder` as one original-layout .safetensors checkpoint at `out`."""
    from safetensors.torch import load_file, save_file

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    state.update(unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_cfg))
    state.update(vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_cfg))
    state.update(clip_to_ldm(load_file(folder / "text_encoder" / "model.safetensors")))
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
