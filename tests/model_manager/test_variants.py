"""fp16, bf16 and int8 variants: made once, stored with their bytes and PSNR, and loadable within a stated PSNR."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model_manager import quality
from sdserve.errors import SdserveError
from sdserve.models_client import StoredModel
from sdserve_core import quant
from sdserve_core.quant import weight_bytes
from service.models import ModelEntry
from tests.model_manager.harness import TINY_REPO, Sidecar, render_served

# Lowest acceptable PSNR (dB) of each variant's image against fp32's, same seed and prompt. Measured on the tiny
# random-weight model: about 75 (fp16), 57 (bf16) and 50 (int8) dB; the bounds leave room for other CPUs.
MIN_PSNR = {"fp16": 60.0, "bf16": 45.0, "int8": 35.0}
SPEC = quality.RenderSpec(size=64, steps=3)


@pytest.fixture(scope="module")
def variants(
    tmp_path_factory: pytest.TempPathFactory, tiny_root: Path
) -> Iterator[tuple[Sidecar, dict[str, StoredModel]]]:
    """The tiny model imported as fp32, and its fp16, bf16 and int8 variants made by the sidecar."""
    store = tmp_path_factory.mktemp("variants-store")
    args = ["--quality-steps", str(SPEC.steps), "--quality-size", str(SPEC.size)]
    side = Sidecar(store, import_roots=[tiny_root], args=args).start()
    made = {}
    with side.client() as c:
        made["fp32"] = c.import_model(str(tiny_root / "tiny-sd")).model
        for variant in ("fp16", "bf16", "int8"):
            made[variant] = c.create_variant("tiny-sd", variant).model
    yield side, made
    side.stop()


def test_variants_are_stored_with_bytes_and_quality(variants: tuple[Sidecar, dict[str, StoredModel]]) -> None:
    side, made = variants
    fp32 = made["fp32"]
    assert fp32.quality is None
    for variant in ("fp16", "bf16", "int8"):
        m = made[variant]
        assert (m.revision, m.variant, m.state) == (fp32.revision, variant, "ready")
        assert Path(m.path) == Path(fp32.path).parent / variant
        assert m.source.kind == "derived" and m.source.derived_from == "fp32"
        assert m.quality is not None and m.quality.psnr_db is not None, m.quality
        assert m.quality.psnr_db >= MIN_PSNR[variant], (variant, m.quality.psnr_db)
        assert (m.quality.seed, m.quality.steps, m.quality.width, m.quality.device) == (0, SPEC.steps, SPEC.size, "cpu")
        files = [p for p in Path(m.path).rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert m.size_bytes == sum(p.stat().st_size for p in files)
        meta = json.loads((Path(m.path) / "sdserve.json").read_text())
        assert (meta["variant"], meta["revision"]) == (variant, fp32.revision)
    assert made["fp16"].size_bytes < 0.6 * fp32.size_bytes
    assert made["bf16"].size_bytes < 0.6 * fp32.size_bytes
    assert made["int8"].size_bytes < 0.75 * made["fp16"].size_bytes
    with side.client() as c:
        again = c.create_variant("tiny-sd", "int8")
        shown = {m.variant: m for m in c.get("tiny-sd").variants}
    assert again.already_present and again.model.path == made["int8"].path
    assert shown["int8"].quality == made["int8"].quality, "show reports the stored measurement"


def test_fp16_and_bf16_load_in_the_server_within_the_stated_psnr(
    variants: tuple[Sidecar, dict[str, StoredModel]],
) -> None:
    _side, made = variants
    reference = render_served(Path(made["fp32"].path))
    for variant in ("fp16", "bf16"):
        folder = Path(made[variant].path)
        assert ModelEntry.read(folder).variant == variant
        image = render_served(folder)
        assert quality.psnr(reference, image) >= MIN_PSNR[variant], variant


def test_int8_loads_with_load_int8_component_within_the_stated_psnr(
    variants: tuple[Sidecar, dict[str, StoredModel]], tmp_path: Path
) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    _side, made = variants
    folder, fp32 = Path(made["int8"].path), Path(made["fp32"].path)
    assert ModelEntry.read(folder).variant == "int8"
    assert quant.is_int8_component(folder, "unet") and quant.is_int8_component(folder, "text_encoder")
    assert not quant.is_int8_component(folder, "vae")
    unet = quant.load_int8_component(UNet2DConditionModel, folder, "unet", torch.float32, "cpu")
    text = quant.load_int8_component(CLIPTextModel, folder, "text_encoder", torch.float32, "cpu")
    assert unet.down_blocks[0].resnets[0].conv1.weight_int8.dtype == torch.int8
    assert isinstance(unet.conv_in, torch.nn.Conv2d), "conv_in stays in float"
    full = UNet2DConditionModel.from_pretrained(fp32, subfolder="unet", use_safetensors=True)
    assert weight_bytes(unet) < 0.35 * weight_bytes(full)
    assert text.dtype == torch.float32
    image = quality.render(folder, "int8", SPEC)
    reference = quality.render(fp32, "fp32", SPEC)
    assert quality.psnr(reference, image) >= MIN_PSNR["int8"]

    # Files that are not a complete int8 component are refused with a clear error.
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "unet" / quant.QUANT_CONFIG).read_text())
    config["modules"].append("conv_norm_out")
    (broken / "unet" / quant.QUANT_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a Linear or Conv2d"):
        quant.load_int8_component(UNet2DConditionModel, broken, "unet", torch.float32, "cpu")
    with pytest.raises(ValueError, match="not an int8 component"):
        quant.load_int8_component(UNet2DConditionModel, broken, "vae", torch.float32, "cpu")


def test_pull_of_an_int8_variant_stores_fp32_then_int8(sidecar: Sidecar) -> None:
    with sidecar.client() as c:
        result = c.pull(TINY_REPO, variant="int8")
        assert result.model.variant == "int8"
        assert [m.variant for m in result.also_published] == ["fp32"]
        assert result.model.quality is not None and result.model.quality.psnr_db is not None
        again = c.pull(TINY_REPO, variant="int8")
    assert again.already_present and again.model.path == result.model.path


def test_variant_errors(variants: tuple[Sidecar, dict[str, StoredModel]]) -> None:
    side, _made = variants
    with side.client() as c:
        with pytest.raises(SdserveError) as err:
            c.create_variant("tiny-sd", "fp32")
        assert err.value.violations[0].field == "variant"
        with pytest.raises(SdserveError) as err:
            c.create_variant("no-such-model", "fp16")
        assert err.value.code == "NOT_FOUND"
        with pytest.raises(SdserveError) as err:
            c.create_variant("tiny-sd", "int4")
        assert err.value.code == "INVALID_ARGUMENT"
