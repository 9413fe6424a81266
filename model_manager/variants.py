"""Makes fp16, bf16 and int8 variants of a stored diffusers folder (safetensors in, safetensors out).

Every weight component the folder has is converted: the UNet, the VAE, and the text encoders (SDXL has two; its
refiner only the second). int8 quantizes the UNet and the text encoders (sdserve_core.quant.WEIGHT_BASE); the VAE
is stored in fp16 beside them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from model_manager.progress import Reporter
from model_manager.weights import DTYPE_BYTES, read_header
from sdserve_core import quant

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class VariantError(ValueError):
    """The variant cannot be made (for example a weight overflows fp16)."""


def _cast_file(source: Path, dest: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(source), framework="pt", device="cpu") as fh:
        metadata = fh.metadata() or {"format": "pt"}
        for key in fh.keys():  # noqa: SIM118 - safe_open handles are not mappings
            tensor = fh.get_tensor(key)
            if tensor.is_floating_point():
                cast = tensor.to(dtype)
                if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
                    raise VariantError(f"{source.parent.name}/{key} has values outside the {dtype} range")
                tensor = cast
            out[key] = tensor.contiguous()
    save_file(out, str(dest), metadata=metadata)


def _component_class(component: str) -> Any:
    if component == "text_encoder":
        from transformers import CLIPTextModel

        return CLIPTextModel
    if component == "text_encoder_2":
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return UNet2DConditionModel if component == "unet" else AutoencoderKL


def estimate_bytes(source: Path, variant: str) -> int:
    """An upper bound of the variant's bytes: every floating weight at 2 bytes, other files as they are."""
    total = 0
    for path in source.rglob("*"):
        if not path.is_file() or path.name == "manifest.json":
            continue
        if path.suffix == ".safetensors":
            header = read_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                n = 1
                for dim in info["shape"]:
                    n *= int(dim)
                floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
                total += n * (2 if floating else DTYPE_BYTES.get(info["dtype"], 8))
            total += 64 * 1024
        else:
            total += path.stat().st_size
    return total


def make_variant(source: Path, dest: Path, variant: str, reporter: Reporter) -> None:
    """Writes `variant` of the diffusers folder `source` into the empty folder `dest` (sdserve.json excluded)."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if not path.is_file() or rel.parts[0] in WEIGHT_COMPONENTS or rel.name in ("manifest.json", "sdserve.json"):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)
    # A component the folder does not have (an SDXL refiner's first text encoder) is skipped.
    for component in (c for c in WEIGHT_COMPONENTS if (source / c).is_dir()):
        reporter.stage("quantizing" if variant == "int8" else "converting", message=component)
        src, dst = source / component, dest / component
        dst.mkdir(parents=True, exist_ok=True)
        if variant == "int8" and component in quant.WEIGHT_BASE:
            quant.quantize_component(_component_class(component), src, dst)
            continue
        dtype = _DTYPES["fp16" if variant == "int8" else variant]
        for path in sorted(src.iterdir()):
            if path.suffix == ".safetensors":
                _cast_file(path, dst / path.name, dtype)
            elif path.is_file():
                shutil.copyfile(path, dst / path.name)
