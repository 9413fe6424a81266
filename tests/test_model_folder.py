"""The model-folder contract (sdserve_core): sdserve.json read and write, native size, layout, int8 round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdserve_core import model_folder, quant
from sdserve_core.model_folder import FolderMeta
from service.models import SD15_LATENT_RGB, ModelEntry
from service.tiny import build_tiny

RGB = {"factors": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9], [1.0, 1.1, 1.2]], "bias": [0.5, 0.25, 0.0]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (UNet sample size 16, three VAE blocks: 64x64 pixels)."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


def layout(folder: Path) -> Path:
    """A folder with model_index.json and the required (empty) subfolders, no configs and no sdserve.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    for sub in model_folder.REQUIRED_SUBFOLDERS:
        (folder / sub).mkdir(exist_ok=True)
    return folder


def test_write_then_read_round_trips_every_field_and_keeps_unknown_keys(tmp_path: Path) -> None:
    base = {"revision": "old", "custom": {"kept": True}, "default_steps": 30}
    model_folder.write_meta(
        tmp_path,
        base,
        name="m",
        revision="abc123",
        variant="fp16",
        description="a model",
        default_width=768,
        default_height=512,
        default_guidance_scale=3.0,
        inpaint_model="m-inpaint",
        latent_rgb=RGB,
    )
    assert base == {"revision": "old", "custom": {"kept": True}, "default_steps": 30}, "base is not modified"
    assert model_folder.read_meta(tmp_path) == FolderMeta(
        revision="abc123",
        variant="fp16",
        description="a model",
        default_width=768,
        default_height=512,
        default_steps=30,
        default_guidance_scale=3.0,
        inpaint_model="m-inpaint",
        latent_rgb=(((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), (0.7, 0.8, 0.9), (1.0, 1.1, 1.2)), (0.5, 0.25, 0.0)),
    )
    raw = model_folder.read_meta_dict(tmp_path)
    assert raw["custom"] == {"kept": True} and raw["name"] == "m" and raw["format"] == model_folder.META_FORMAT


def test_write_meta_output_is_sorted_two_space_json_with_a_newline(tmp_path: Path) -> None:
    model_folder.write_meta(tmp_path, {"variant": "fp32", "description": "x"}, revision="r")
    text = (tmp_path / "sdserve.json").read_text()
    assert text == '{\n  "description": "x",\n  "format": 1,\n  "revision": "r",\n  "variant": "fp32"\n}\n'
    model_folder.write_meta(tmp_path, {"format": 2})
    assert json.loads((tmp_path / "sdserve.json").read_text()) == {"format": 2}, "an explicit format is kept"


def test_defaults_when_sdserve_json_and_configs_are_absent(tmp_path: Path) -> None:
    folder = layout(tmp_path / "bare")
    assert model_folder.read_meta(folder) == FolderMeta()
    assert FolderMeta() == FolderMeta(
        revision="", variant="fp32", description="", default_width=512, default_height=512, default_steps=20,
        default_guidance_scale=7.5, inpaint_model="", latent_rgb=None,
    )  # fmt: skip
    assert model_folder.native_size(folder) == (512, 512)
    assert model_folder.read_meta_dict(folder) == {}
    entry = ModelEntry.read(folder)
    assert entry.variant == "fp32" and entry.default_steps == 20 and entry.default_guidance_scale == 7.5
    assert (entry.default_width, entry.default_height) == (512, 512)
    assert entry.latent_rgb == SD15_LATENT_RGB and entry.inpaint_model == "" and entry.description == ""
    assert len(entry.revision) == 16, "no revision in sdserve.json: the folder's content revision"


def test_a_malformed_sdserve_json_fails_the_reader_but_not_the_carrying_writer(tmp_path: Path) -> None:
    folder = layout(tmp_path / "bad")
    (folder / "sdserve.json").write_text("{not json")
    with pytest.raises(ValueError):
        model_folder.read_meta(folder)
    assert model_folder.read_meta_dict(folder) == {}
    (folder / "sdserve.json").write_text("[1, 2]")
    assert model_folder.read_meta_dict(folder) == {}, "not an object: nothing to carry"


def test_native_size_of_the_tiny_model(tiny: Path) -> None:
    assert model_folder.native_size(tiny) == (64, 64)
    meta = model_folder.read_meta(tiny)
    assert (meta.default_width, meta.default_height) == (64, 64)
    assert (meta.default_steps, meta.default_guidance_scale, meta.variant) == (20, 7.5, "fp32")
    assert model_folder.read_meta_dict(tiny)["format"] == model_folder.META_FORMAT
    entry = ModelEntry.read(tiny)
    assert (entry.default_width, entry.default_height, entry.description) == (64, 64, meta.description)


def test_native_size_reads_a_listed_sample_size(tmp_path: Path) -> None:
    folder = layout(tmp_path / "listed")
    (folder / "unet" / "config.json").write_text(json.dumps({"sample_size": [96, 64]}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2]}))
    assert model_folder.native_size(folder) == (192, 192)
    model_folder.write_meta(folder, {}, default_height=128)
    meta = model_folder.read_meta(folder)
    assert (meta.default_width, meta.default_height) == (192, 128)


def test_a_missing_model_index_is_named(tmp_path: Path) -> None:
    folder = layout(tmp_path / "m")
    (folder / "model_index.json").unlink()
    for read in (model_folder.check_layout, ModelEntry.read):
        with pytest.raises(ValueError) as raised:
            read(folder)
        assert str(raised.value) == f"{folder} has no model_index.json"


@pytest.mark.parametrize("sub", model_folder.REQUIRED_SUBFOLDERS)
def test_a_missing_subfolder_is_named(tmp_path: Path, sub: str) -> None:
    folder = layout(tmp_path / "m")
    shutil.rmtree(folder / sub)
    for read in (model_folder.check_layout, ModelEntry.read):
        with pytest.raises(ValueError) as raised:
            read(folder)
        assert str(raised.value) == f"{folder} has no {sub}/ folder"
    model_folder.check_layout(layout(folder))


def test_int8_written_by_sdserve_core_loads_close_to_the_float_unet(tiny: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    config = quant.quantize_component(UNet2DConditionModel, tiny / "unet", tmp_path / "unet")
    assert config["format"] == quant.QUANT_FORMAT and config["skipped"] == list(quant.SKIP_MODULES)
    assert (tmp_path / "unet" / f"{quant.WEIGHT_BASE['unet']}{quant.INT8_SUFFIX}").is_file()
    assert quant.is_int8_component(tmp_path, "unet")
    int8 = quant.load_int8_component(UNet2DConditionModel, tmp_path, "unet", torch.float32, "cpu")
    full = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet", use_safetensors=True).eval()
    assert isinstance(int8.mid_block.resnets[0].conv1, quant.Int8Conv2d)
    assert isinstance(int8.conv_in, torch.nn.Conv2d), "conv_in stays in float"
    assert quant.weight_bytes(int8) < 0.35 * quant.weight_bytes(full)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 7, 32, generator=generator)
    with torch.no_grad():
        expected = full(sample, 10, encoder_hidden_states=context).sample
        got = int8(sample, 10, encoder_hidden_states=context).sample
    error = (got - expected).norm() / expected.norm()
    assert error < 0.02, f"relative error {error:.4f}"
    assert not torch.equal(got, expected), "the int8 weights are really used"


def test_quantize_weight_is_symmetric_per_output_channel() -> None:
    weight = torch.tensor([[1.0, -0.6, 0.2], [0.0, 0.0, 0.0], [-254.0, 100.0, 8.0]])
    q, scale = quant.quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3,)
    assert q[0].tolist() == [127, -76, 25] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [-127, 50, 4]
    assert torch.allclose(q.float() * scale[:, None], weight, atol=float(scale.max()) / 2)
