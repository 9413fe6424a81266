"""Local imports: single-file checkpoints in the original layout, diffusers folders, and what is refused."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_manager import single_file
from sdserve.errors import SdserveError
from tests.model_manager import ldm
from tests.model_manager.harness import Sidecar, render_served

# Parameter counts of the real architectures, to check the shipped configs build the right networks.
UNET_PARAMS = {"sd1": 859_520_964, "sd2": 865_910_724}


@pytest.fixture(scope="module")
def converter(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> Iterator[Sidecar]:
    """One sidecar for the conversion tests (it imports torch once)."""
    side = Sidecar(tmp_path_factory.mktemp("convert-store"), import_roots=[tiny_root]).start()
    yield side
    side.stop()


def test_single_file_import_generates_the_same_image_as_its_diffusers_folder(
    converter: Sidecar, tiny_root: Path, tiny_sd: Path
) -> None:
    sidecar = converter
    checkpoint = ldm.write_checkpoint(tiny_sd, tiny_root / "checkpoints" / "tiny-ldm.safetensors")
    with sidecar.client() as c:
        result = c.import_model(str(checkpoint), config_from=str(tiny_sd))
        again = c.import_model(str(checkpoint), config_from=str(tiny_sd))
    m = result.model
    assert (m.name, m.variant, m.state, m.source.kind) == ("tiny-ldm", "fp32", "ready", "single_file")
    assert len(m.revision) == 16 and m.source.path == str(checkpoint)
    assert again.already_present and again.model.path == m.path
    folder = Path(m.path)
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        original = load_file(tiny_sd / sub / f"{name}.safetensors")
        converted = load_file(folder / sub / f"{name}.safetensors")
        assert original.keys() == converted.keys()
        assert all(torch.equal(original[k], converted[k]) for k in original), sub
    assert json.loads((folder / "sdserve.json").read_text())["variant"] == "fp32"
    np.testing.assert_array_equal(render_served(folder), render_served(tiny_sd))


def test_single_file_fp16_checkpoint_is_stored_as_fp16(converter: Sidecar, tiny_root: Path, tiny_sd: Path) -> None:
    sidecar = converter
    checkpoint = ldm.write_checkpoint(tiny_sd, tiny_root / "checkpoints" / "tiny-half.safetensors", torch.float16)
    with sidecar.client() as c:
        m = c.import_model(str(checkpoint), config_from=str(tiny_sd)).model
    assert m.variant == "fp16"
    assert load_file(Path(m.path) / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == (
        torch.float16
    )


def test_single_file_errors_name_what_is_missing(converter: Sidecar, tiny_root: Path, tiny_sd: Path) -> None:
    sidecar = converter
    checkpoint = ldm.write_checkpoint(tiny_sd, tiny_root / "checkpoints" / "tiny-unknown.safetensors")
    with sidecar.client() as c:
        # The tiny network is no shipped architecture: detection says so and suggests config_from.
        with pytest.raises(SdserveError) as err:
            c.import_model(str(checkpoint))
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "path"
        assert "unknown architecture" in err.value.message and "config_from" in err.value.message
        # Forcing an architecture: with no CLIP vocabulary in the store there is no tokenizer to ship with it.
        with pytest.raises(SdserveError) as err:
            c.import_model(str(checkpoint), architecture="sd1")
        assert err.value.code == "FAILED_PRECONDITION" and "vocabulary" in err.value.message
        with pytest.raises(SdserveError) as err:
            c.import_model(str(checkpoint), architecture="sdxl")
        assert err.value.violations[0].field == "architecture"
        assert "tiny-unknown" not in {m.name for m in c.list().models}
    assert not any((sidecar.store / "staging").iterdir())


@pytest.mark.parametrize("architecture", single_file.SD_ARCHITECTURES)
def test_shipped_configs_convert_full_size_checkpoints(architecture: str) -> None:
    """Each shipped config builds the real network and maps an original-layout checkpoint onto it, key for key and
    shape for shape (meta tensors: no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = single_file.CONFIGS / architecture
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS[architecture[:3]] + (
        320 * 5 * 3 * 3 if "inpainting" in architecture else 0
    )
    checkpoint = {**ldm.unet_to_ldm(unet.state_dict(), unet.config), **ldm.vae_to_ldm(vae.state_dict(), vae.config)}
    text_to_ldm = ldm.clip_to_ldm if architecture.startswith("sd1") else ldm.open_clip_to_ldm
    checkpoint.update(text_to_ldm(text.state_dict()))
    detected = single_file.detect(checkpoint)
    assert detected == ("sd2-v" if architecture == "sd2-base" else architecture)
    converted = dict(single_file.component_states(checkpoint, folder, architecture))
    assert set(converted) == {"unet", "vae", "text_encoder"}
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
        assert (folder / name).is_file()


def test_folder_import(sidecar: Sidecar, tiny_sd: Path) -> None:
    with sidecar.client() as c:
        result = c.import_model(str(tiny_sd))
        details = c.get("tiny-sd")
    m = result.model
    assert (m.name, m.variant, m.source.kind, m.source.path) == ("tiny-sd", "fp32", "local_folder", str(tiny_sd))
    assert len(m.revision) == 16
    (variant,) = details.variants
    assert {f.path for f in variant.files} >= {"unet/diffusion_pytorch_model.safetensors", "sdserve.json"}
    meta = json.loads((Path(m.path) / "sdserve.json").read_text())
    assert meta["default_steps"] == 20, "the folder's own sdserve.json defaults are kept"
    assert (meta["name"], meta["revision"], meta["variant"]) == ("tiny-sd", m.revision, "fp32")


def test_imports_outside_the_import_folders_and_pickles_are_refused(
    sidecar: Sidecar, tiny_root: Path, tiny_sd: Path, tmp_path: Path, sidecars: Callable[..., Sidecar]
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(tiny_sd, outside)
    link = tiny_root / "escape-link"
    link.symlink_to(outside, target_is_directory=True)
    bad = tiny_root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "model.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    (bad / "disguised.safetensors").write_bytes(pickle.dumps({"state_dict": {}}))
    truncated = bad / "truncated.safetensors"
    truncated.write_bytes((tiny_sd / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
    pickled_folder = bad / "pickled-folder"
    shutil.copytree(tiny_sd, pickled_folder, dirs_exist_ok=True)
    weights = pickled_folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))

    def refused(path: str, name: str = "") -> SdserveError:
        with sidecar.client() as c, pytest.raises(SdserveError) as err:
            c.import_model(path, name=name)
        return err.value

    for path in (str(outside), str(link), "/etc", "relative/path", str(tiny_root / ".." / "outside")):
        err = refused(path)
        assert err.code == "INVALID_ARGUMENT" and err.violations[0].field == "path", path
    assert "outside the import folders" in refused(str(link)).message
    assert "pickled" in refused(str(bad / "model.ckpt")).message
    assert "pickled" in refused(str(bad / "disguised.safetensors")).message
    err = refused(str(pickled_folder))
    assert "only pickled weights" in err.message and "safetensors" in err.message
    err = refused(str(truncated))
    assert err.code == "DATA_LOSS" and "truncated" in err.message
    for name in ("a/b", "..", "../x", "", ".hidden", "x" * 101):
        if name:
            err = refused(str(tiny_sd), name=name)
            assert [v.field for v in err.violations] == ["name"], name
    with sidecar.client() as c:
        assert c.list().models == ()
    # With no import folders configured, imports over the API are off.
    closed = sidecars(tmp_path / "closed-store")
    with closed.client() as c, pytest.raises(SdserveError) as e:
        c.import_model(str(tiny_sd))
    assert "local imports are disabled" in e.value.message
