"""int8 weight-only quantization stored as safetensors (int8 weights + per-channel fp32 scales) and its loader.

Scheme: every nn.Linear and nn.Conv2d weight of the UNet and the text encoder (except the UNet's conv_in and
conv_out) is stored as int8 with one symmetric scale per output channel: w ≈ weight_int8 * weight_scale. Biases,
norms and embeddings keep their float values. At run time the int8 tensors stay int8 on the device and each layer
dequantizes its own weight in its forward pass, so resident weight memory is 1 byte per quantized parameter (half of
fp16, a quarter of fp32) plus one layer's weight in the compute dtype while that layer runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QUANT_FORMAT = "sdserve-int8-weight-only/1"
QUANT_CONFIG = "quantization.json"
INT8_SUFFIX = ".int8.safetensors"


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight and per-output-channel scales, dequantized per forward."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, device: Any = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.empty((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads `.weight` (dtype follows the scales)."""
        return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)


class Int8Conv2d(nn.Module):
    """nn.Conv2d (zero padding) with an int8 weight and per-output-channel scales, dequantized per forward."""

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, conv: nn.Conv2d, device: Any = None):
        super().__init__()
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        shape = tuple(conv.weight.shape)
        self.register_buffer("weight_int8", torch.empty(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(shape[0], dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(shape[0], device=device)) if conv.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale[:, None, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None, None, None]
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def skeleton(component_cls: Any, folder: Path) -> nn.Module:
    """The component built from `folder`'s config with parameters on the meta device (no memory, no weights read)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(component_cls, "load_config"):
            model = component_cls.from_config(component_cls.load_config(folder))
        else:
            model = component_cls(component_cls.config_class.from_pretrained(folder))
    return model  # type: ignore[no-any-return]


def non_persistent_buffers(model: nn.Module) -> set[str]:
    """Names of the buffers not saved in a state dict (what a loaded state dict may lack)."""
    names = set()
    for prefix, module in model.named_modules():
        for buf in getattr(module, "_non_persistent_buffers_set", ()):
            names.add(f"{prefix}.{buf}" if prefix else buf)
    return names


def is_int8_component(folder: Path, subfolder: str) -> bool:
    """True when `folder/subfolder` holds an int8 component written by quantize_component."""
    return (folder / subfolder / QUANT_CONFIG).is_file()


def load_int8_component(
    component_cls: Any, folder: Path, subfolder: str, dtype: torch.dtype, device: str | torch.device
) -> Any:
    """Loads an int8 component (UNet2DConditionModel or CLIPTextModel) from safetensors only, ready for inference.

    `component_cls` is the diffusers or transformers class; `dtype` is the compute dtype for everything that is not
    int8 (biases, norms, embeddings, the scales); the int8 weights stay int8 on `device`. Raises ValueError when the
    files are not a complete int8 component of that class.
    """
    from safetensors.torch import load_file

    path = Path(folder) / subfolder
    try:
        config = json.loads((path / QUANT_CONFIG).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} has no {QUANT_CONFIG}: not an int8 component") from None
    if config.get("format") != QUANT_FORMAT:
        raise ValueError(f"{path / QUANT_CONFIG}: unknown format {config.get('format')!r}, expected {QUANT_FORMAT}")
    weights = sorted(path.glob(f"*{INT8_SUFFIX}"))
    if len(weights) != 1:
        raise ValueError(f"{path} must hold exactly one *{INT8_SUFFIX} file, found {len(weights)}")
    state = load_file(weights[0], device="cpu")
    model = skeleton(component_cls, path)
    for name in config["modules"]:
        parent_name, _, attr = str(name).rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, attr)
        if isinstance(module, nn.Linear):
            replacement: nn.Module = Int8Linear(
                module.in_features, module.out_features, module.bias is not None, "meta"
            )
        elif isinstance(module, nn.Conv2d):
            replacement = Int8Conv2d(module, "meta")
        else:
            raise ValueError(f"{path}: {name} is a {type(module).__name__}, not a Linear or Conv2d layer")
        setattr(parent, attr, replacement)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - non_persistent_buffers(model))
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise ValueError(
            f"{weights[0]} does not match the {subfolder} config: {len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected tensors (e.g. {example})"
        )
    # nn.Module.to casts floating tensors only (int8 stays int8) and skips diffusers' dtype-cast warning.
    nn.Module.to(model, device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
