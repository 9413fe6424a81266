"""sdserve_core.adapter_file: every LoRA and textual-inversion layout read from real-shaped files of the tiny model,
the refusals, the manifest, model_base/fits, and kohya key names that diffusers loads to the same images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdserve_core import adapter_file as af
from service.tiny_sdxl import build_tiny_sdxl
from tests.harness import TINY

ROOT = Path(__file__).resolve().parent.parent


def _lora_pipe(folder: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def make_diffusers_lora(model: Path, dest: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    """A real diffusers-layout LoRA of the model (UNet attention and text-encoder attention, rank 4, random non-zero
    weights), saved with diffusers' own save_lora_weights; returns its state dict."""
    import peft
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = _lora_pipe(model)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    # transformers' own add_adapter wants a newer peft than diffusers does; peft injects the same layers.
    peft.inject_adapter_in_model(
        peft.LoraConfig(
            r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        ),
        pipe.text_encoder,
    )
    StableDiffusionPipeline.save_lora_weights(
        dest.parent,
        unet_lora_layers=peft.get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=peft.get_peft_model_state_dict(pipe.text_encoder),
        weight_name=dest.name,
        safe_serialization=True,
    )
    return dict(load_file(dest))


def kohya_state_dict(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = af.to_kohya_keys(diffusers_sd)
    out = {names[k]: v for k, v in diffusers_sd.items()}
    for alpha in af.kohya_alpha_keys(out):
        down = out[alpha.removesuffix(".alpha") + ".lora_down.weight"]
        out[alpha] = torch.tensor(float(down.shape[0]))
    return out


@pytest.fixture(scope="module")
def tiny(models_dir: Path) -> Path:
    return models_dir / TINY


@pytest.fixture(scope="module")
def lora_files(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same LoRA in the diffusers, peft (unet only) and kohya layouts."""
    folder = tmp_path_factory.mktemp("loras")
    sd = make_diffusers_lora(tiny, folder / "diffusers.safetensors")
    save_file(kohya_state_dict(sd), folder / "kohya.safetensors")
    peft_sd = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    save_file(peft_sd, folder / "peft.safetensors")
    return {"diffusers": folder / "diffusers.safetensors", "kohya": folder / "kohya.safetensors",
            "peft": folder / "peft.safetensors"}  # fmt: skip


def test_model_base_reads_the_configs(tiny: Path, tmp_path: Path) -> None:
    assert af.model_base(tiny) == ("sd15", "cross_attention_dim=32,text_width=32")
    assert af.model_base(ROOT / "models" / "shapes") == ("sd15", "cross_attention_dim=64,text_width=64")
    base = build_tiny_sdxl(tmp_path / "xl", seed=0, kind="base")
    refiner = build_tiny_sdxl(tmp_path / "xl-refiner", seed=1, kind="refiner")
    assert af.model_base(base) == ("sdxl", "cross_attention_dim=64,text_width=32,text_width_2=32")
    assert af.model_base(refiner) == ("sdxl", "cross_attention_dim=32,text_width_2=32")


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_lora_is_read_in_each_layout(lora_files: dict[str, Path], tiny: Path, layout: str) -> None:
    f = af.inspect(lora_files[layout])
    assert (f.kind, f.layout, f.family, f.token) == ("lora", layout, "sd15", "")
    assert f.base == "cross_attention_dim=32,text_width=32"
    assert f.targets == ("text_encoder", "unet")
    assert f.size_bytes == lora_files[layout].stat().st_size
    assert af.fits(f, *af.model_base(tiny)) is None
    reason = af.fits(f, *af.model_base(ROOT / "models" / "shapes"))
    assert reason == (
        "adapter family sd15 (cross_attention_dim=32,text_width=32) does not fit model family sd15 "
        "(cross_attention_dim=64,text_width=64)"
    )


def test_a_peft_layout_lora_targets_the_unet(lora_files: dict[str, Path]) -> None:
    f = af.inspect(lora_files["peft"])
    assert (f.layout, f.targets, f.base, f.family) == ("peft", ("unet",), "cross_attention_dim=32", "sd15")


def test_sdxl_loras_and_family_rules(tmp_path: Path) -> None:
    r = 2
    sd = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.ones(r, 64),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.lora_up.weight": torch.ones(64, r),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k.alpha": torch.tensor(2.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(r, 32),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, r),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(r, 32),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(32, r),
    }
    save_file(sd, tmp_path / "xl.safetensors")
    f = af.inspect(tmp_path / "xl.safetensors")
    assert (f.layout, f.family, f.targets) == ("kohya", "sdxl", ("text_encoder", "text_encoder_2", "unet"))
    assert f.base == "cross_attention_dim=64,text_width=32,text_width_2=32"
    xl = build_tiny_sdxl(tmp_path / "tiny-xl", seed=0, kind="base")
    assert af.fits(f, *af.model_base(xl)) is None
    # A UNet-only LoRA is SDXL by its cross-attention width 2048.
    save_file({"unet.a.attn2.to_v.lora_A.weight": torch.ones(r, 2048), "unet.a.attn2.to_v.lora_B.weight":
               torch.ones(8, r)}, tmp_path / "u.safetensors")  # fmt: skip
    assert af.inspect(tmp_path / "u.safetensors").family == "sdxl"
    reason = af.fits(af.inspect(tmp_path / "u.safetensors"), "sd15", "cross_attention_dim=768,text_width=768")
    assert reason is not None and "adapter family sdxl (cross_attention_dim=2048)" in reason


def test_textual_inversion_layouts(tmp_path: Path, tiny: Path) -> None:
    save_file({"<cat>": torch.randn(2, 32)}, tmp_path / "d.safetensors")
    save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "a.safetensors")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "x.safetensors")
    d = af.inspect(tmp_path / "d.safetensors")
    assert (d.kind, d.layout, d.family, d.base, d.token, d.targets) == (
        "textual_inversion", "diffusers", "sd15", "text_width=32", "<cat>", ("text_encoder",)
    )  # fmt: skip
    assert af.inspect(tmp_path / "d.safetensors", token="<dog>").token == "<dog>"
    a = af.inspect(tmp_path / "a.safetensors")
    assert (a.layout, a.token, a.base) == ("a1111", "", "text_width=32")
    assert af.describe(tmp_path / "a.safetensors", "my-style", "file:x").file.token == "my-style"
    x = af.inspect(tmp_path / "x.safetensors", token="<xl>")
    assert (x.layout, x.family, x.base, x.targets, x.token) == (
        "sdxl", "sdxl", "text_width=768,text_width_2=1280", ("text_encoder", "text_encoder_2"), "<xl>"
    )  # fmt: skip
    assert af.fits(d, *af.model_base(tiny)) is None
    assert af.fits(x, *af.model_base(tiny)) is not None
    assert af.token_problem("a b") is not None and af.token_problem("<ok>") is None


def test_refusals_name_the_file_and_the_rule(tmp_path: Path) -> None:
    (tmp_path / "lora.pt").write_bytes(b"\x80\x02pickled")
    with pytest.raises(af.AdapterFormatError, match=r"lora\.pt: only \.safetensors; pickle formats are refused"):
        af.inspect(tmp_path / "lora.pt")
    (tmp_path / "sneaky.safetensors").write_bytes(b"PK\x03\x04zipped torch file")
    with pytest.raises(af.AdapterFormatError, match=r"sneaky\.safetensors: starts like a pickle"):
        af.inspect(tmp_path / "sneaky.safetensors")
    save_file({"model.weight": torch.ones(2, 2), "other.bias": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(af.AdapterFormatError, match="no recognisable keys"):
        af.inspect(tmp_path / "model.safetensors")
    mixed = {"unet.a.attn2.to_k.lora_A.weight": torch.ones(2, 8), "lora_unet_b.lora_down.weight": torch.ones(2, 8)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    with pytest.raises(af.AdapterFormatError, match=r"mixed\.safetensors: mixed layouts"):
        af.inspect(tmp_path / "mixed.safetensors")
    good = tmp_path / "cut.safetensors"
    save_file({"<t>": torch.ones(1, 8)}, good)
    good.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(af.AdapterFormatError, match=r"cut\.safetensors: not a valid safetensors file"):
        af.inspect(good)


def test_manifest_round_trip(tmp_path: Path) -> None:
    save_file({"<cat>": torch.randn(2, 32)}, tmp_path / af.WEIGHTS)
    m = af.describe(tmp_path / af.WEIGHTS, "cat", "file:/x/cat.safetensors")
    assert m.sha256 == af.sha256_file(tmp_path / af.WEIGHTS)
    af.write_manifest(tmp_path, m)
    assert af.read_manifest(tmp_path) == m
    keys = set(json.loads((tmp_path / af.MANIFEST).read_text()))
    assert keys == {"name", "kind", "layout", "family", "base", "targets", "token", "sha256", "size_bytes", "source"}
    (tmp_path / af.MANIFEST).write_text("{}")
    with pytest.raises(af.AdapterFormatError, match=r"adapter\.json: malformed"):
        af.read_manifest(tmp_path)


def test_the_module_imports_no_torch() -> None:
    code = "import sys, sdserve_core.adapter_file; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _render(model: Path, lora: Any) -> np.ndarray:
    pipe = _lora_pipe(model)
    if lora is not None:
        pipe.load_lora_weights(lora)
    out = pipe(
        "a tiny test image", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator("cpu").manual_seed(1),
    )  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float32)


def test_kohya_keys_load_in_diffusers_to_the_same_images(lora_files: dict[str, Path], tiny: Path) -> None:
    from safetensors.torch import load_file

    plain = _render(tiny, None)
    with_file = _render(tiny, str(lora_files["diffusers"]))
    with_kohya = _render(tiny, load_file(lora_files["kohya"]))
    assert np.abs(with_file - plain).max() > 1e-3, "the LoRA changes nothing"
    np.testing.assert_allclose(with_kohya, with_file, atol=1e-5)
