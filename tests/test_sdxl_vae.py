"""SDXL's VAE in half precision: its real VAE overflows in float16, so a float16 model decodes in float32 when the
VAE's config says force_upcast, or loads a fixed float16 VAE that sdserve.json names (`vae_fp16`).

The overflow is reproduced on a tiny SDXL by scaling its decoder's first convolution by 1e5: the weights still fit
in float16 (max 65504) but the activations do not, exactly the failure of SDXL's own VAE. float16 runs on the CPU
here (slowly), so these tests decode latents directly through the family's decode (what previews and every
family-level decode use) rather than running whole pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from sdserve_core import families, model_folder
from sdserve_core.components import load_components
from sdserve_core.families.base import vae_decode
from service.tiny_sdxl import build_tiny_sdxl


def overflowing(folder: Path, sub: str = "vae") -> None:
    vae = AutoencoderKL.from_pretrained(folder / sub)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    vae.save_pretrained(folder / sub)


@pytest.fixture(scope="module")
def hot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_tiny_sdxl(tmp_path_factory.mktemp("vae") / "hot", seed=0)
    overflowing(folder)
    return folder


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def test_float16_decode_upcasts_and_has_no_nans(hot: Path) -> None:
    components = load_components(hot, "fp32", torch.float16, "cpu")
    assert components.vae.dtype == torch.float16 and components.vae.config.force_upcast
    pixels = families.get("sdxl").decode(components, latents().half())
    assert torch.isfinite(pixels).all()
    # The VAE is back in float16 for the pipelines' own decodes.
    assert components.vae.dtype == torch.float16
    # Without the upcast the same decode overflows: the test above could fail.
    assert not torch.isfinite(vae_decode(components, latents().half(), upcast=False)).all()
    # And in float32 the overflowing VAE decodes what the upcast decode gave, to float16 input rounding.
    full = load_components(hot, "fp32", torch.float32, "cpu")
    reference = families.get("sdxl").decode(full, latents().half().float())
    assert (reference - pixels).abs().max() < 1e-2


def test_a_fixed_fp16_vae_named_in_sdserve_json_replaces_vae_in_float16(tmp_path: Path) -> None:
    """`vae_fp16` names a subfolder with a VAE that is safe in float16 (force_upcast false): float16 loads it and
    decodes without upcasting; float32 keeps vae/."""
    folder = build_tiny_sdxl(tmp_path / "fixed", seed=0)
    fixed = AutoencoderKL.from_pretrained(folder / "vae")
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(folder / "vae_fp16")
    overflowing(folder)  # vae/ itself overflows in float16
    meta = model_folder.read_meta_dict(folder)
    model_folder.write_meta(folder, meta, vae_fp16="vae_fp16")
    half = load_components(folder, "fp32", torch.float16, "cpu")
    assert not half.vae.config.force_upcast
    assert torch.isfinite(families.get("sdxl").decode(half, latents().half())).all()
    assert load_components(folder, "fp32", torch.float32, "cpu").vae.config.force_upcast


@pytest.mark.parametrize("bad", ["../vae", "a/b", ".."])
def test_vae_fp16_must_name_a_subfolder(tmp_path: Path, bad: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / model_folder.META_FILE).write_text(json.dumps({"vae_fp16": bad}))
    with pytest.raises(ValueError, match="vae_fp16"):
        model_folder.read_meta(folder)
