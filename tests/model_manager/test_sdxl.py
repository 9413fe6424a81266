"""SDXL in the sidecar: Hub pulls (base, refiner, fp16 files), folder imports, single-file checkpoints in Stability's
original layout, fp16/bf16/int8 variants with their quality, and the family and tasks of every stored model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from model_manager import capabilities, quality, single_file
from sdserve import models_cli
from sdserve.errors import SdserveError
from sdserve.models_client import Snapshot, StoredModel
from sdserve_core import quant
from sdserve_core.components import load_components
from service.tiny import build_tiny
from service.tiny_sdxl import build_tiny_sdxl
from tests.model_manager import sgm
from tests.model_manager.harness import Sidecar
from tests.model_manager.hubserver import HubServer, folder_files

BASE_REPO, REFINER_REPO = "sdserve-test/tiny-sdxl", "sdserve-test/tiny-sdxl-refiner"
# Broken copies of the base: without text_encoder_2/ (its tokenizer kept), and without both second-encoder folders.
NO_ENCODER_REPO, NO_PAIR_REPO = "sdserve-test/no-encoder-2", "sdserve-test/no-pair-2"
KINDS = {"base": "tiny-sdxl", "refiner": "tiny-sdxl-refiner", "inpaint": "tiny-sdxl-inpaint"}
TASKS = {
    "base": ("generate", "edit", "inpaint"),
    "refiner": ("edit", "inpaint", "refine"),
    "inpaint": ("inpaint",),
}
WEIGHTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
# Lowest acceptable PSNR (dB) of each variant against fp32 on the tiny random-weight SDXL models (32 px, 2 steps).
# Measured: fp16 about 72-74, bf16 about 55, int8 about 49 dB; the bounds leave room for other CPUs.
MIN_PSNR = {"fp16": 60.0, "bf16": 45.0, "int8": 35.0}


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An import folder with the tiny SDXL base, refiner and inpainting models, and a tiny SD 1.x model."""
    root = tmp_path_factory.mktemp("sdxl-imports")
    build_tiny_sdxl(root / KINDS["base"], seed=0, kind="base")
    build_tiny_sdxl(root / KINDS["refiner"], seed=20, kind="refiner")
    build_tiny_sdxl(root / KINDS["inpaint"], seed=40, kind="inpaint")
    build_tiny(root / "tiny-sd", seed=0)
    return root


def _repo_files(folder: Path) -> dict[str, bytes]:
    """A Hub-layout SDXL repository: the diffusers files, fp16 files of every weight component, and what a pull
    must skip (a root checkpoint, an extra VAE folder, ONNX and pickled files, a README)."""
    files = folder_files(folder)
    for component, base in WEIGHTS.items():
        if (folder / component).is_dir():
            tensors = load_file(folder / component / f"{base}.safetensors")
            half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
            files[f"{component}/{base}.fp16.safetensors"] = save(half, metadata={"format": "pt"})
    files["README.md"] = b"# tiny sdxl\n"
    files["sd_xl_base_1.0.safetensors"] = files["unet/diffusion_pytorch_model.safetensors"]
    files["vae_1_0/diffusion_pytorch_model.safetensors"] = files["vae/diffusion_pytorch_model.safetensors"]
    files["text_encoder_2/model.onnx"] = b"onnx"
    files["unet/diffusion_pytorch_model.bin"] = b"\x80\x02pickled"
    return files


@pytest.fixture(scope="module")
def sdxl_hub(sdxl_root: Path) -> Iterator[HubServer]:
    """A local hub with the tiny SDXL base and refiner, and base repositories that lack their second text encoder."""
    server = HubServer()
    base = _repo_files(sdxl_root / KINDS["base"])
    server.repo(BASE_REPO).add_commit(base)
    server.repo(REFINER_REPO).add_commit(_repo_files(sdxl_root / KINDS["refiner"]))
    server.repo(NO_ENCODER_REPO).add_commit({k: v for k, v in base.items() if not k.startswith("text_encoder_2/")})
    pair = ("text_encoder_2/", "tokenizer_2/")
    server.repo(NO_PAIR_REPO).add_commit({k: v for k, v in base.items() if not k.startswith(pair)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory, sdxl_hub: HubServer, sdxl_root: Path) -> Iterator[Sidecar]:
    """One sidecar for this module's tests, pulling from the SDXL hub and importing from sdxl_root."""
    sidecar = Sidecar(tmp_path_factory.mktemp("sdxl-store"), hub_url=sdxl_hub.url, import_roots=[sdxl_root]).start()
    yield sidecar
    sidecar.stop()


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _expected_files(source: Path) -> set[str]:
    """The files a stored copy of the tiny folder `source` has: its own, sdserve.json, and the manifest."""
    return _files(source) | {"manifest.json"}


def test_hub_pulls_of_sdxl_base_and_refiner_load_as_sdxl(side: Sidecar, sdxl_root: Path) -> None:
    with side.client() as c:
        base = c.pull(BASE_REPO).model
        half = c.pull(BASE_REPO, variant="fp16", name="tiny-sdxl").model
        refiner = c.pull(REFINER_REPO).model
        with pytest.raises(SdserveError) as no_encoder:
            c.pull(NO_ENCODER_REPO)
        with pytest.raises(SdserveError) as no_pair:
            c.pull(NO_PAIR_REPO)
        names = {m.name for m in c.list().models}
    assert (base.variant, base.family, base.tasks) == ("fp32", "sdxl", TASKS["base"])
    assert (refiner.variant, refiner.family, refiner.tasks) == ("fp32", "sdxl", TASKS["refiner"])
    for model, kind in ((base, "base"), (refiner, "refiner")):
        folder = Path(model.path)
        assert _files(folder) == _expected_files(sdxl_root / KINDS[kind]), kind
        components = load_components(folder, "fp32", torch.float32, "cpu")
        assert components.family == "sdxl" and components.text_encoder_2 is not None
        assert (components.text_encoder is None) == (kind == "refiner")
    # The fp16 pull took the repository's fp16 files, the second text encoder's included, under standard names.
    folder = Path(half.path)
    assert half.variant == "fp16" and _files(folder) == _files(Path(base.path))
    for component, name in WEIGHTS.items():
        tensors = load_file(folder / component / f"{name}.safetensors")
        assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point()), component
    assert load_components(folder, "fp16", torch.float32, "cpu").family == "sdxl"
    # A repository without a file its components need is refused before downloading; one whose model_index.json
    # names a component it has no files for, once its model_index.json is read, before publishing.
    for err in (no_encoder, no_pair):
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "repo_id"
    assert "missing text_encoder_2/config.json" in no_encoder.value.message
    assert "names text_encoder_2, tokenizer_2, but there are no text_encoder_2/ files" in no_pair.value.message
    assert "no-encoder-2" not in names and "no-pair-2" not in names
    assert not any((side.store / "staging").iterdir())


def test_folder_imports_report_family_and_tasks_in_the_api_and_the_cli(
    tmp_path: Path, sdxl_root: Path, sidecars: Callable[..., Sidecar], capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    first = sidecars(store, import_roots=[sdxl_root])
    with first.client() as c:
        imported = {kind: c.import_model(str(sdxl_root / name)).model for kind, name in KINDS.items()}
        sd = c.import_model(str(sdxl_root / "tiny-sd")).model
    for kind, model in imported.items():
        assert (model.name, model.family, model.tasks, model.variant) == (KINDS[kind], "sdxl", TASKS[kind], "fp32")
        assert _files(Path(model.path)) == _expected_files(sdxl_root / KINDS[kind])
    assert (sd.family, sd.tasks) == ("sd15", ("generate", "edit", "inpaint"))
    assert imported["inpaint"].unet_in_channels == 9
    first.stop()
    # A restarted sidecar reads them again from the folders.
    again = sidecars(store, import_roots=[sdxl_root])
    with again.client() as c:
        listed = {m.name: m for m in c.list().models}
        with c.watch() as watch:
            snapshot = next(iter(watch))
    assert {n: (m.family, m.tasks) for n, m in listed.items()} == {
        **{KINDS[k]: ("sdxl", TASKS[k]) for k in KINDS},
        "tiny-sd": ("sd15", ("generate", "edit", "inpaint")),
    }
    assert isinstance(snapshot, Snapshot)
    assert {m.name: m.tasks for m in snapshot.models} == {n: m.tasks for n, m in listed.items()}

    def run(*argv: str) -> str:
        code = models_cli.main([*argv, "--manager", again.target])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out

    rows = {line.split()[0]: line for line in run("list").splitlines()[1:] if line.startswith("tiny-")}
    assert "FAMILY" in run("list").splitlines()[0] and "TASKS" in run("list").splitlines()[0]
    assert " sdxl " in rows["tiny-sdxl-refiner"] and " edit,inpaint,refine " in rows["tiny-sdxl-refiner"]
    assert " sd15 " in rows["tiny-sd"] and " generate,edit,inpaint " in rows["tiny-sd"]
    shown = run("show", "tiny-sdxl-inpaint")
    assert "  family       sdxl" in shown and "  tasks        inpaint" in shown
    data = json.loads(run("show", "tiny-sdxl", "--json"))
    assert data["variants"][0]["family"] == "sdxl" and data["variants"][0]["tasks"] == list(TASKS["base"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_single_file_sdxl_checkpoints_convert_back_tensor_for_tensor(side: Sidecar, sdxl_root: Path, kind: str) -> None:
    original = sdxl_root / KINDS[kind]
    checkpoint = sgm.write_checkpoint(original, sdxl_root / "checkpoints" / f"sgm-{kind}.safetensors")
    with side.client() as c:
        # The tiny network is no shipped architecture: detection says what it found and what ships.
        with pytest.raises(SdserveError) as err:
            c.import_model(str(checkpoint))
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "path"
        assert "SDXL-layout" in err.value.message and "sdxl-refiner" in err.value.message
        assert "config_from" in err.value.message
        model = c.import_model(str(checkpoint), config_from=str(original)).model
    assert (model.family, model.tasks, model.source.kind) == ("sdxl", TASKS[kind], "single_file")
    folder = Path(model.path)
    assert _files(folder) == {f for f in _expected_files(original) if not f.endswith("tokenizer.json")}
    for component, name in WEIGHTS.items():
        if not (original / component).is_dir():
            assert not (folder / component).exists()
            continue
        before = load_file(original / component / f"{name}.safetensors")
        after = load_file(folder / component / f"{name}.safetensors")
        assert before.keys() == after.keys(), component
        assert all(torch.equal(before[k], after[k]) for k in before), component
    if kind == "base":
        # Both tokenizers too: the converted folder renders exactly the original's image.
        spec = quality.RenderSpec(size=32, steps=2)
        np.testing.assert_array_equal(quality.render(folder, "fp32", spec), quality.render(original, "fp32", spec))


def test_single_file_sdxl_errors_name_what_is_wrong(side: Sidecar, sdxl_root: Path) -> None:
    from safetensors.torch import save_file

    base = sdxl_root / KINDS["base"]
    full = load_file(sgm.write_checkpoint(base, sdxl_root / "checkpoints" / "sgm-full.safetensors"))
    no_bigg = sdxl_root / "checkpoints" / "sgm-no-bigg.safetensors"
    save_file({k: v for k, v in full.items() if not k.startswith(sgm.OPEN_CLIP_BASE)}, str(no_bigg))
    refiner_ckpt = sgm.write_checkpoint(sdxl_root / KINDS["refiner"], sdxl_root / "checkpoints" / "sgm-r.safetensors")
    with side.client() as c:
        with pytest.raises(SdserveError) as err:
            c.import_model(str(no_bigg), config_from=str(base))
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "config_from"
        assert "text_encoder_2" in err.value.message and "conditioner.embedders.0.transformer." in err.value.message
        with pytest.raises(SdserveError) as err:
            c.import_model(str(refiner_ckpt), config_from=str(base), name="wrong-configs")
        assert err.value.violations[0].field == "config_from"
        assert "UNet does not match" in err.value.message
        names = {m.name for m in c.list().models}
    assert "sgm-no-bigg" not in names and "wrong-configs" not in names
    assert not any((side.store / "staging").iterdir())


# Parameter counts of the real networks, to check the shipped configs build them.
UNET_PARAMS = {"sdxl-base": 2_567_463_684, "sdxl-refiner": 2_259_526_660, "sdxl-inpainting": 2_567_478_084}
TEXT_PARAMS = {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


@pytest.mark.parametrize("architecture", single_file.SDXL_ARCHITECTURES)
def test_shipped_sdxl_configs_convert_full_size_checkpoints(architecture: str) -> None:
    """Each shipped SDXL config builds the real network, is detected from an original-layout checkpoint and maps it
    key for key and shape for shape (meta tensors: no memory, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = single_file.CONFIGS / architecture
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        clip = None
        if (folder / "text_encoder").is_dir():
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == UNET_PARAMS[architecture]
    assert sum(p.numel() for p in big_g.parameters()) == TEXT_PARAMS["text_encoder_2"]
    assert clip is None or sum(p.numel() for p in clip.parameters()) == TEXT_PARAMS["text_encoder"]
    checkpoint = sgm.sgm_state(
        (unet.state_dict(), unet.config),
        (vae.state_dict(), vae.config),
        None if clip is None else clip.state_dict(),
        big_g.state_dict(),
    )
    assert single_file.detect(checkpoint) == architecture
    converted = dict(single_file.component_states(checkpoint, folder, architecture))
    assert set(converted) == {"unet", "vae", "text_encoder_2"} | ({"text_encoder"} if clip is not None else set())
    kind = {"sdxl-base": "base", "sdxl-refiner": "refiner", "sdxl-inpainting": "inpaint"}[architecture]
    assert capabilities.describe(folder) == capabilities.Capabilities("sdxl", TASKS[kind])


@pytest.fixture(scope="module")
def variants(side: Sidecar, sdxl_root: Path) -> dict[tuple[str, str], StoredModel]:
    """The tiny SDXL base and refiner imported as fp32 (as names of their own), and their fp16, bf16 and int8
    variants, each measured against fp32."""
    made = {}
    with side.client() as c:
        for kind in ("base", "refiner"):
            name = f"v-{kind}"
            made[kind, "fp32"] = c.import_model(str(sdxl_root / KINDS[kind]), name=name).model
            for variant in ("fp16", "bf16", "int8"):
                made[kind, variant] = c.create_variant(name, variant).model
    return made


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_sdxl_variants_convert_every_component_and_measure_quality(
    variants: dict[tuple[str, str], StoredModel], kind: str
) -> None:
    from transformers import CLIPTextModelWithProjection

    fp32 = Path(variants[kind, "fp32"].path)
    for variant in ("fp16", "bf16", "int8"):
        m = variants[kind, variant]
        folder = Path(m.path)
        assert (m.family, m.tasks, m.state) == ("sdxl", TASKS[kind], "ready")
        assert m.quality is not None and m.quality.psnr_db is not None, (variant, m.quality)
        assert m.quality.psnr_db >= MIN_PSNR[variant], (kind, variant, m.quality.psnr_db)
        assert (folder / "text_encoder").is_dir() == (kind == "base")
        assert {p.relative_to(folder).parts[0] for p in folder.iterdir()} == {p.name for p in fp32.iterdir()}
        components = load_components(folder, variant, torch.float32, "cpu")
        assert components.family == "sdxl"
    int8 = Path(variants[kind, "int8"].path)
    assert quant.is_int8_component(int8, "text_encoder_2") and quant.is_int8_component(int8, "unet")
    assert quant.is_int8_component(int8, "text_encoder") == (kind == "base")
    text = quant.load_int8_component(CLIPTextModelWithProjection, int8, "text_encoder_2", torch.float32, "cpu")
    assert text.text_projection.weight_int8.dtype == torch.int8
    half = load_file(Path(variants[kind, "fp16"].path) / "text_encoder_2" / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in half.values() if t.is_floating_point())
