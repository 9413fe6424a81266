"""The Python client and the CLI against a real server with tiny SDXL models: prompt_2, micro-conditioning, a
refiner pass with its progress passes and identity, family in ListModels and the memory policy in GetServerInfo."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import (
    AsyncClient,
    Client,
    CropOffset,
    Event,
    ImageSize,
    Progress,
    Result,
    SdserveError,
    Started,
)
from service.tiny import build_tiny
from service.tiny_sdxl import build_tiny_sdxl
from tests.harness import TINY, ServerThread, pixels, png, running, sample_image
from tests.test_cli import run_cli

SDXL = "tiny-sdxl"
REFINER = "tiny-sdxl-refiner"
SIZE = ImageSize(64, 64)  # the tiny SDXL models' native size


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A real server with a tiny SDXL base model (the default), its refiner and an SD 1.x model."""
    folder = tmp_path_factory.mktemp("sdxl-models")
    build_tiny(folder / TINY, seed=0)
    build_tiny_sdxl(folder / SDXL, seed=0, kind="base")
    build_tiny_sdxl(folder / REFINER, seed=5, kind="refiner")
    yield from running(folder, default_model=SDXL)


@pytest.fixture()
def xl(sdxl_server: ServerThread) -> Iterator[Client]:
    with Client(sdxl_server.target) as c:
        yield c


def _split(events: list[Event]) -> tuple[Started, list[Progress], Result]:
    started = [e for e in events if isinstance(e, Started)]
    results = [e for e in events if isinstance(e, Result)]
    assert len(started) == 1 and len(results) == 1, events
    return started[0], [e for e in events if isinstance(e, Progress)], results[0]


def _passes(progress: list[Progress]) -> dict[str, list[Progress]]:
    """The steps of each pass, checking that every base step comes before every refiner step."""
    names = [p.denoise_pass for p in progress]
    base = names.count("base")
    assert names == ["base"] * base + ["refiner"] * (len(names) - base), names
    by_pass = {"base": progress[:base], "refiner": progress[base:]}
    for name, steps in by_pass.items():
        # Steps count within their pass.
        assert [p.step for p in steps] == list(range(1, len(steps) + 1)), name
        assert all(p.total_steps == len(steps) for p in steps), name
    return by_pass


def test_refiner_latent_handoff(xl: Client) -> None:
    events = list(
        xl.stream_generate(
            "a red circle",
            prompt_2="a blue square",
            original_size=ImageSize(128, 96),
            refiner=REFINER,
            refiner_switch_at=0.5,
            steps=4,
            seed=7,
        )
    )
    started, progress, result = _split(events)
    assert started.model == SDXL
    assert started.refiner_model == REFINER
    assert started.refiner_model_revision and started.refiner_model_variant
    assert started.memory_strategy
    passes = _passes(progress)
    assert passes["base"] and passes["refiner"]
    assert len(progress) == 4  # a hand-off splits `steps` between the passes
    assert result.refiner is not None
    assert (result.refiner.model, result.refiner.mode) == (REFINER, "latent_handoff")
    assert result.refiner.switch_at == pytest.approx(0.5)
    assert result.refiner.revision == started.refiner_model_revision
    assert result.refiner.variant == started.refiner_model_variant
    assert result.memory_strategy == started.memory_strategy
    c = result.conditioning
    assert c is not None
    assert (c.original_size, c.target_size, c.crops_coords_top_left) == (ImageSize(128, 96), SIZE, CropOffset(0, 0))
    # Unset negative values mean the positive ones (reported either way); the refiner's scores take their defaults.
    assert c.negative_original_size in (None, ImageSize(128, 96))
    assert c.negative_target_size in (None, SIZE)
    assert c.aesthetic_score == pytest.approx(6.0)
    assert c.negative_aesthetic_score == pytest.approx(2.5)
    assert result.parameters["prompt_2"] == "a blue square"
    assert len(result.images) == 1 and (result.image.width, result.image.height) == (64, 64)


def test_refiner_image_mode(xl: Client) -> None:
    stream = xl.stream_generate(
        "a red circle", refiner=REFINER, refiner_mode="image", refiner_strength=0.5, steps=4, seed=7
    )
    started, progress, result = _split(list(stream))
    passes = _passes(progress)
    # The base model runs the whole schedule; the refiner int(steps x strength) steps.
    assert (len(passes["base"]), len(passes["refiner"])) == (4, 2)
    assert result.refiner is not None
    assert (result.refiner.model, result.refiner.mode) == (REFINER, "image")
    assert result.refiner.strength == pytest.approx(0.5)
    assert started.refiner_model == REFINER


def test_sdxl_fields_reach_the_model(xl: Client) -> None:
    """Same request, same bytes; a different prompt_2 or micro-conditioning, a different image."""
    base = xl.generate("a red circle", steps=2, seed=11)
    again = xl.generate("a red circle", steps=2, seed=11)
    assert base.image.data == again.image.data
    assert base.refiner is None
    assert base.conditioning is not None and base.conditioning.original_size == SIZE
    variants = {
        "prompt_2": xl.generate("a red circle", prompt_2="a green field", steps=2, seed=11),
        "original_size": xl.generate("a red circle", original_size=ImageSize(16, 16), steps=2, seed=11),
        "crop": xl.generate("a red circle", crops_coords_top_left=CropOffset(32, 0), steps=2, seed=11),
    }
    for name, result in variants.items():
        assert (pixels(result.image.data) != pixels(base.image.data)).any(), name
    # negative_prompt_2 replaces negative_prompt for the second encoder (an empty negative prompt may be zeros).
    negative = xl.generate("a red circle", negative_prompt="blur", steps=2, seed=11)
    negative_2 = xl.generate("a red circle", negative_prompt="blur", negative_prompt_2="sharp", steps=2, seed=11)
    assert (pixels(negative.image.data) != pixels(negative_2.image.data)).any()
    assert variants["prompt_2"].parameters["prompt_2"] == "a green field"
    crop = variants["crop"].conditioning
    assert crop is not None and crop.crops_coords_top_left == CropOffset(32, 0)


def test_edit_on_the_refiner_with_an_aesthetic_score(xl: Client) -> None:
    image = png(sample_image())
    low = xl.edit(image, "x", model=REFINER, aesthetic_score=1.0, strength=0.5, steps=4, seed=3)
    high = xl.edit(image, "x", model=REFINER, aesthetic_score=9.0, strength=0.5, steps=4, seed=3)
    assert low.conditioning is not None and low.conditioning.aesthetic_score == pytest.approx(1.0)
    assert (pixels(low.image.data) != pixels(high.image.data)).any()


def test_async_client_refiner(sdxl_server: ServerThread) -> None:
    async def run() -> tuple[Result, list[str]]:
        passes: list[str] = []
        async with AsyncClient(sdxl_server.target) as c:
            stream = c.stream_generate("a red circle", refiner=REFINER, steps=3, seed=2)
            result = await stream.result(lambda p: passes.append(p.denoise_pass))
        return result, passes

    result, passes = asyncio.run(run())
    assert result.refiner is not None and result.refiner.model == REFINER
    assert passes[0] == "base" and passes[-1] == "refiner"


def test_list_models_family_and_server_memory(xl: Client) -> None:
    models, default = xl.list_models()
    assert default == SDXL
    by_name = {m.name: m for m in models}
    assert (by_name[SDXL].family, by_name[SDXL].refiner) == ("sdxl", False)
    assert (by_name[REFINER].family, by_name[REFINER].refiner) == ("sdxl", True)
    assert (by_name[TINY].family, by_name[TINY].refiner) == ("sd15", False)
    info = xl.server_info()
    assert info.HasField("memory")
    for mode in (info.memory.vae_tiling, info.memory.vae_slicing, info.memory.attention_slicing):
        assert mode in ("auto", "on", "off")


def test_sdxl_fields_on_an_sd15_model_are_invalid(xl: Client) -> None:
    with pytest.raises(SdserveError) as err:
        xl.generate("x", model=TINY, prompt_2="y", steps=2)
    assert err.value.code == "INVALID_ARGUMENT"
    assert any(v.field == "params.prompt_2" for v in err.value.violations), err.value.violations


# The CLI ---------------------------------------------------------------------------------------------------------


def test_cli_generate_with_refiner_and_original_size(sdxl_server: ServerThread, xl: Client, tmp_path: Path) -> None:
    out = tmp_path / "xl.png"
    previews = tmp_path / "previews"
    args = ["--prompt", "a red circle", "--prompt-2", "a blue square", "--steps", "4", "--seed", "7"]
    args += ["--refiner", REFINER, "--refiner-switch", "0.5", "--original-size", "128x96", "--crop", "8,16"]
    proc = run_cli(sdxl_server, "generate", *args, "--out", str(out), "--json", "--preview-dir", str(previews))
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert [line.rsplit(" ", 1)[1] for line in steps] == ["base"] * 2 + ["refiner"] * 2, proc.stderr
    assert f"+ refiner {REFINER}@" in proc.stderr
    report = json.loads(proc.stdout)
    parameters = report["parameters"]
    assert parameters["refiner"]["model"] == REFINER
    assert parameters["conditioning"]["original_size"] == {"width": 128, "height": 96}
    assert parameters["conditioning"]["crops_coords_top_left"] == {"top": 8, "left": 16}
    expected = xl.generate(
        "a red circle",
        prompt_2="a blue square",
        steps=4,
        seed=7,
        refiner=REFINER,
        refiner_switch_at=0.5,
        original_size=ImageSize(128, 96),
        crops_coords_top_left=CropOffset(8, 16),
    )
    assert out.read_bytes() == expected.image.data
    names = sorted(p.name for p in previews.iterdir())
    assert names == [f"{n}-step-000{i}-0.jpg" for n in ("base", "refiner") for i in (1, 2)], names


def test_cli_refiner_image_mode(sdxl_server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(
        sdxl_server,
        "generate",
        *("--prompt", "x", "--steps", "2", "--seed", "1", "--refiner", REFINER, "--refiner-mode", "image"),
        *("--refiner-strength", "0.5", "--negative-aesthetic-score", "1.0", "--out", str(tmp_path / "i.png")),
    )
    assert proc.returncode == 0, proc.stderr
    passes = [line.rsplit(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert passes == ["base", "base", "refiner"], proc.stderr


def test_cli_sdxl_flag_on_sd15_model_is_one_line(sdxl_server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(
        sdxl_server, "generate", "--model", TINY, "--prompt", "x", "--prompt-2", "y", "--out", str(tmp_path / "x.png")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdserve: error: params.prompt_2: "), lines


def test_cli_models_served_and_info(sdxl_server: ServerThread) -> None:
    proc = run_cli(sdxl_server, "models", "served")
    assert proc.returncode == 0, proc.stderr
    rows = {line[2:].split()[0]: line for line in proc.stdout.splitlines()}
    assert " sdxl " in rows[SDXL] and rows[SDXL].startswith("*")
    assert " sdxl refiner " in rows[REFINER]
    assert " sd15 " in rows[TINY]
    proc = run_cli(sdxl_server, "info")
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith("memory       vae tiling ") for line in proc.stdout.splitlines()), proc.stdout
