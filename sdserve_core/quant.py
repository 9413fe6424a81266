"""int8 weight-only quantization stored as safetensors (int8 weights + per-channel fp32 scales): writer and loader.

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
# The weight file base name of each quantized component (diffusers' and transformers' safetensors names).
WEIGHT_BASE = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
# The first and last UNet convolutions are small and the most sensitive to rounding; they stay in float.
SKIP_MODULES = ("conv_in", "conv_out")


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


# ---- writing ------------------------------------------------------------------------------------


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


# The module prefix transformers 4 saved CLIP text encoders under (its CLIPTextModel wrapped a `text_model`);
# transformers 5's CLIPTextModel has none, so files from the Hub and the model built here may disagree.
TEXT_MODEL_PREFIX = "text_model."


def align_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """`state` with each key renamed to the model's name for it where they differ only by TEXT_MODEL_PREFIX."""
    out: dict[str, torch.Tensor] = {}
    n = len(TEXT_MODEL_PREFIX)
    for key, tensor in state.items():
        if key not in expected:
            if key.startswith(TEXT_MODEL_PREFIX) and key[n:] in expected:
                key = key[n:]
            elif TEXT_MODEL_PREFIX + key in expected:
                key = TEXT_MODEL_PREFIX + key
        out[key] = tensor
    return out


def quantize_component(component_cls: Any, source: Path, dest: Path) -> dict[str, Any]:
    """Writes the int8 form of the component in `source` (a diffusers subfolder) to `dest`; returns its config."""
    from safetensors.torch import load_file, save_file

    base = WEIGHT_BASE[source.name]
    state: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob(f"{base}*.safetensors")):
        state.update(load_file(path))
    model = skeleton(component_cls, source)
    expected = set(model.state_dict())
    state = align_keys(state, expected)
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
