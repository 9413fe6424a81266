"""Writes int8 weight-only variants (sdserve_core.quant describes the scheme and loads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdserve_core.quant import INT8_SUFFIX, QUANT_CONFIG, QUANT_FORMAT, non_persistent_buffers, skeleton

WEIGHT_BASE = {"unet": "diffusion_pytorch_model", "text_encoder": "model"}
# The first and last UNet convolutions are small and the most sensitive to rounding; they stay in float.
SKIP_MODULES = ("conv_in", "conv_out")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel) with weight ≈ int8 * scale, symmetric in [-127, 127]."""
    w = weight.detach().to(torch.float32)
    flat = w.reshape(w.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale.contiguous()


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the Linear and zero-padded Conv2d modules to quantize, in model order."""
    names = []
    for name, module in model.named_modules():
        if name in SKIP_MODULES:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"):
            names.append(name)
    return names


def quantize_state_dict(
    state: dict[str, torch.Tensor], modules: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Replaces `<module>.weight` of each listed module by `weight_int8` and `weight_scale`; returns (state, done)."""
    wanted = set(modules)
    out: dict[str, torch.Tensor] = {}
    done = []
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module in wanted:
            q, scale = quantize_weight(tensor)
            out[f"{module}.weight_int8"] = q
            out[f"{module}.weight_scale"] = scale
            done.append(module)
        else:
            out[key] = tensor.contiguous()
    return out, done


def quantize_component(component_cls: Any, source: Path, dest: Path) -> dict[str, Any]:
    """Writes the int8 form of the component in `source` (a diffusers subfolder) to `dest`; returns its config."""
    from safetensors.torch import load_file, save_file

    base = WEIGHT_BASE[source.name]
    state: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob(f"{base}*.safetensors")):
        state.update(load_file(path))
    model = skeleton(component_cls, source)
    expected = set(model.state_dict())
    if not expected <= set(state) | non_persistent_buffers(model):
        missing = sorted(expected - set(state))
        raise ValueError(f"{source.name}: weights lack {len(missing)} tensors the config needs, e.g. {missing[0]}")
    quantized, done = quantize_state_dict(state, quantizable_modules(model))
    dest.mkdir(parents=True, exist_ok=True)
    config = {
        "format": QUANT_FORMAT,
        "scheme": "symmetric int8 per output channel; weight = weight_int8 * weight_scale[:, None, ...]",
        "modules": done,
        "skipped": [m for m in SKIP_MODULES if m in dict(model.named_modules())],
    }
    save_file(quantized, dest / f"{base}{INT8_SUFFIX}", metadata={"format": "pt", "sdserve_quantization": QUANT_FORMAT})
    (dest / QUANT_CONFIG).write_text(json.dumps(config, indent=1))
    for name in ("config.json",):
        (dest / name).write_bytes((source / name).read_bytes())
    return config


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of a loaded model (what it holds resident)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
