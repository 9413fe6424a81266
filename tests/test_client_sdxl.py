"""The Python client's SDXL fields without a server: options to protobuf and back, and the CLI's SDXL flags."""

from __future__ import annotations

import io
import json

import pytest

from sdserve import (
    CropOffset,
    ImageSize,
    MicroConditioning,
    ModelInfo,
    Progress,
    RefinerPass,
    Result,
    Started,
    _convert,
)
from sdserve.cli import ProgressBar, _options, build_parser, info_dict, info_lines, main
from sdserve.types import EditOptions, GenerationOptions, InpaintOptions
from sdserve.v1 import diffusion_pb2 as pb

ALL_SDXL: GenerationOptions = {
    "prompt_2": "oil painting",
    "negative_prompt_2": "blurry",
    "original_size": ImageSize(1024, 768),
    "target_size": ImageSize(512, 384),
    "crops_coords_top_left": CropOffset(16, 32),
    "negative_original_size": ImageSize(256, 256),
    "negative_target_size": ImageSize(128, 64),
    "negative_crops_coords_top_left": CropOffset(0, 8),
    "aesthetic_score": 7.5,
    "negative_aesthetic_score": 1.5,
    "refiner": "xl-refiner",
    "refiner_mode": "latent_handoff",
    "refiner_switch_at": 0.75,
}


def test_params_without_sdxl_options_leave_them_unset() -> None:
    p = _convert.params("a cat", {"steps": 3})
    assert p.prompt_2 == "" and p.negative_prompt_2 == ""
    assert not p.HasField("conditioning")
    assert not p.HasField("refiner")


def test_params_carry_every_sdxl_option() -> None:
    p = _convert.params("a cat", ALL_SDXL)
    assert (p.prompt_2, p.negative_prompt_2) == ("oil painting", "blurry")
    c = p.conditioning
    assert (c.original_size.width, c.original_size.height) == (1024, 768)
    assert (c.target_size.width, c.target_size.height) == (512, 384)
    assert (c.crops_coords_top_left.top, c.crops_coords_top_left.left) == (16, 32)
    assert (c.negative_original_size.width, c.negative_original_size.height) == (256, 256)
    assert (c.negative_target_size.width, c.negative_target_size.height) == (128, 64)
    assert (c.negative_crops_coords_top_left.top, c.negative_crops_coords_top_left.left) == (0, 8)
    assert (c.aesthetic_score, c.negative_aesthetic_score) == (7.5, 1.5)
    r = p.refiner
    assert (r.model, r.mode, r.switch_at) == ("xl-refiner", pb.REFINER_MODE_LATENT_HANDOFF, 0.75)
    assert not r.HasField("strength")


def test_unset_conditioning_fields_stay_unset() -> None:
    """One option sets only its own field: the server fills in the others' documented defaults."""
    p = _convert.params("a cat", {"target_size": ImageSize(64, 32)})
    c = p.conditioning
    assert c.HasField("target_size")
    for name in ("original_size", "crops_coords_top_left", "negative_original_size", "negative_target_size"):
        assert not c.HasField(name), name
    assert not c.HasField("negative_crops_coords_top_left")
    assert not c.HasField("aesthetic_score") and not c.HasField("negative_aesthetic_score")
    assert not p.HasField("refiner")
    # A zero score is a value, not "unset".
    assert _convert.params("a cat", {"aesthetic_score": 0.0}).conditioning.HasField("aesthetic_score")


def test_refiner_image_mode_and_defaults() -> None:
    p = _convert.params("a cat", {"refiner": "r", "refiner_mode": "image", "refiner_strength": 0.4})
    assert p.refiner.mode == pb.REFINER_MODE_IMAGE
    assert p.refiner.strength == pytest.approx(0.4)
    assert not p.refiner.HasField("switch_at")
    plain = _convert.params("a cat", {"refiner": "r"}).refiner
    assert plain.mode == pb.REFINER_MODE_UNSPECIFIED  # the server's default, LATENT_HANDOFF
    assert not plain.HasField("switch_at") and not plain.HasField("strength")


@pytest.mark.parametrize("key", ["refiner_mode", "refiner_switch_at", "refiner_strength"])
def test_refiner_tuning_without_a_refiner_is_refused(key: str) -> None:
    value = "image" if key == "refiner_mode" else 0.5
    with pytest.raises(ValueError, match=f"{key}.*refiner"):
        _convert.params("a cat", {key: value})  # type: ignore[misc]


def test_unknown_option_still_refused() -> None:
    with pytest.raises(TypeError, match="prompt2"):
        _convert.params("a cat", {"prompt2": "x"})  # type: ignore[typeddict-unknown-key]


def test_edit_and_inpaint_keep_their_strength_apart_from_the_refiners() -> None:
    edit: EditOptions = {"strength": 0.6, "refiner": "r", "refiner_mode": "image", "refiner_strength": 0.2}
    req = _convert.edit_request(b"img", "x", edit)
    assert req.strength == pytest.approx(0.6)
    assert req.params.refiner.strength == pytest.approx(0.2)
    inpaint: InpaintOptions = {
        "strength": 0.9,
        "mask_blur": 4,
        "prompt_2": "two",
        "crops_coords_top_left": CropOffset(),
    }
    ireq = _convert.inpaint_request(b"img", b"mask", "x", inpaint)
    assert ireq.strength == pytest.approx(0.9)
    assert (ireq.mask_blur, ireq.params.prompt_2) == (4, "two")
    assert ireq.params.conditioning.HasField("crops_coords_top_left")


def _resolved(params: pb.GenerationParams, **fields: object) -> pb.ResolvedParameters:
    """What a server echoes for `params` (the SDXL fields only)."""
    return pb.ResolvedParameters(
        model="xl",
        prompt_2=params.prompt_2,
        negative_prompt_2=params.negative_prompt_2,
        conditioning=params.conditioning,
        refiner=params.refiner,
        **fields,  # type: ignore[arg-type]
    )


def test_result_round_trip() -> None:
    """Options sent come back as the same typed values when a server echoes them."""
    sent = _convert.params("a cat", ALL_SDXL)
    resolved = _resolved(
        sent, refiner_model_revision="abc123", refiner_model_variant="fp16", memory_strategy="vae_tiling"
    )
    msg = pb.GenerateResponse(result=pb.ResultEvent(parameters=resolved, request_id="r1"))
    ev = _convert.event(msg)
    assert isinstance(ev, Result)
    assert ev.conditioning == MicroConditioning(
        original_size=ImageSize(1024, 768),
        crops_coords_top_left=CropOffset(16, 32),
        target_size=ImageSize(512, 384),
        negative_original_size=ImageSize(256, 256),
        negative_crops_coords_top_left=CropOffset(0, 8),
        negative_target_size=ImageSize(128, 64),
        aesthetic_score=7.5,
        negative_aesthetic_score=1.5,
    )
    assert ev.refiner == RefinerPass(
        model="xl-refiner", revision="abc123", variant="fp16", mode="latent_handoff", switch_at=0.75, strength=None
    )
    assert ev.memory_strategy == "vae_tiling"
    assert ev.parameters["prompt_2"] == "oil painting"
    assert ev.parameters["refiner"] == {"model": "xl-refiner", "mode": "REFINER_MODE_LATENT_HANDOFF", "switch_at": 0.75}


def test_result_without_sdxl_fields() -> None:
    ev = _convert.event(pb.GenerateResponse(result=pb.ResultEvent(parameters=pb.ResolvedParameters(model="sd"))))
    assert isinstance(ev, Result)
    assert (ev.refiner, ev.conditioning, ev.memory_strategy) == (None, None, "")


def test_image_mode_result() -> None:
    sent = _convert.params("a cat", {"refiner": "r", "refiner_mode": "image", "refiner_strength": 0.25})
    msg = pb.GenerateResponse(result=pb.ResultEvent(parameters=_resolved(sent)))
    ev = _convert.event(msg)
    assert isinstance(ev, Result) and ev.refiner is not None
    assert (ev.refiner.mode, ev.refiner.strength, ev.refiner.switch_at) == ("image", 0.25, None)


def test_started_and_progress_events() -> None:
    started = pb.StartedEvent(
        model="xl",
        refiner_model="xl-refiner",
        refiner_model_revision="rev2",
        refiner_model_variant="fp32",
        memory_strategy="none",
    )
    ev = _convert.event(pb.GenerateResponse(started=started))
    assert isinstance(ev, Started)
    assert (ev.refiner_model, ev.refiner_model_revision, ev.refiner_model_variant) == ("xl-refiner", "rev2", "fp32")
    assert ev.memory_strategy == "none"
    passes = [pb.DENOISE_PASS_UNSPECIFIED, pb.DENOISE_PASS_BASE, pb.DENOISE_PASS_REFINER]
    seen = []
    for value in passes:
        progress = _convert.event(
            pb.GenerateResponse(progress=pb.ProgressEvent(step=1, total_steps=2, denoise_pass=value))
        )
        assert isinstance(progress, Progress)
        seen.append(progress.denoise_pass)
    assert seen == ["", "base", "refiner"]


def test_model_info_family_and_refiner() -> None:
    info = _convert.model_info(pb.ModelInfo(name="xl-refiner", family="sdxl", refiner=True))
    assert isinstance(info, ModelInfo)
    assert (info.family, info.refiner) == ("sdxl", True)
    old = _convert.model_info(pb.ModelInfo(name="sd"))
    assert (old.family, old.refiner) == ("", False)


# The CLI ---------------------------------------------------------------------------------------------------------


def _parse(*args: str) -> GenerationOptions:
    ns = build_parser({}).parse_args(["generate", "--prompt", "p", "--out", "o.png", *args])
    return _options(ns)


def test_cli_flags_become_options() -> None:
    opts = _parse(
        "--prompt-2",
        "oil painting",
        "--negative-prompt-2",
        "blurry",
        "--original-size",
        "1024x768",
        "--target-size",
        "512x384",
        "--crop",
        "16,32",
        "--negative-original-size",
        "256x256",
        "--negative-target-size",
        "128x64",
        "--negative-crop",
        "0,8",
        "--aesthetic-score",
        "7.5",
        "--negative-aesthetic-score",
        "1.5",
        "--refiner",
        "xl-refiner",
        "--refiner-mode",
        "latent",
        "--refiner-switch",
        "0.75",
    )
    assert opts == ALL_SDXL


def test_cli_without_sdxl_flags_sends_none() -> None:
    assert _parse("--steps", "3") == {"steps": 3}


def test_cli_image_mode() -> None:
    opts = _parse("--refiner", "r", "--refiner-mode", "image", "--refiner-strength", "0.3")
    assert opts == {"refiner": "r", "refiner_mode": "image", "refiner_strength": 0.3}


@pytest.mark.parametrize("value", ["1024", "1024x", "x768", "1024X768", "1024*768", "0x768", "16385x8", "-8x8"])
@pytest.mark.parametrize("flag", ["--original-size", "--target-size", "--negative-original-size"])
def test_cli_bad_size_is_a_usage_error_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        # FLAG=VALUE: a value that starts with "-" would otherwise read as a flag.
        build_parser({}).parse_args(["generate", "--prompt", "p", "--out", "o.png", f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"sdserve generate: error: argument {flag}: must be WIDTHxHEIGHT in pixels")
    assert repr(value) in err[0]


@pytest.mark.parametrize("value", ["1", "1,", ",2", "a,b", "1;2", "1, 2", "16385,0", "-1,0"])
@pytest.mark.parametrize("flag", ["--crop", "--negative-crop"])
def test_cli_bad_crop_is_a_usage_error_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser({}).parse_args(["edit", "--image", "i.png", "--prompt", "p", "--out", "o.png", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: must be TOP,LEFT in pixels" in capsys.readouterr().err


def test_cli_sizes_at_the_bounds() -> None:
    opts = _parse("--original-size", "1x16384", "--crop", "0,16384")
    assert opts == {"original_size": ImageSize(1, 16384), "crops_coords_top_left": CropOffset(0, 16384)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--refiner-switch", "0.5"], "--refiner-switch: needs --refiner MODEL"),
        (["--refiner-mode", "image"], "--refiner-mode: needs --refiner MODEL"),
        (["--refiner-strength", "0.5"], "--refiner-strength: needs --refiner MODEL"),
        (["--refiner", "r", "--refiner-strength", "0.5"], "--refiner-strength: applies to --refiner-mode image only"),
        (
            ["--refiner", "r", "--refiner-mode", "image", "--refiner-switch", "0.5"],
            "--refiner-switch: applies to --refiner-mode latent only",
        ),
    ],
)
def test_cli_refiner_flag_rules(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any call: the target is never reached.
    code = main(["--target", "127.0.0.1:1", "generate", "--prompt", "p", "--out", "o.png", *args])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdserve: error: {message}"), lines


def test_cli_bad_refiner_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(
            [
                "inpaint",
                "--image",
                "i",
                "--mask",
                "m",
                "--prompt",
                "p",
                "--out",
                "o",
                "--refiner-mode",
                "latent_handoff",
            ]
        )
    assert "argument --refiner-mode: invalid choice: 'latent_handoff'" in capsys.readouterr().err


def test_help_states_ranges_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "above 0 and below 1 (default 0.8)",
        "above 0 to 1; it runs int(steps x strength) steps, at least 1 (default 0.3)",
        "0 to 10 (default 6.0)",
        "0 to 10 (default 2.5)",
        "each side 1 to 16384",
        "(default 0,0: an uncropped image)",
        "(default: latent)",
    ):
        assert phrase in text, phrase


def test_progress_bar_names_the_pass() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, enabled=True)
    bar.show(1, 2, "base")
    bar.show(1, 1, "refiner")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 1/2 ") and lines[0].endswith(" base")
    assert lines[1].startswith("step 1/1 ") and lines[1].endswith(" refiner")


def test_info_shows_the_memory_policy() -> None:
    info = pb.GetServerInfoResponse(
        version="1",
        memory=pb.MemoryPolicy(
            vae_tiling="auto",
            vae_tiling_min_pixels=1_048_576,
            vae_slicing="on",
            attention_slicing="auto",
            cpu_offload="off",
            offloaded_models=["big"],
        ),
    )
    line = [x for x in info_lines(info) if x.startswith("memory")]
    assert line == [
        "memory       vae tiling auto (from 1,048,576 px), vae slicing on, attention slicing auto, cpu offload off; "
        "device free not measured; offloaded: big"
    ]
    data = info_dict(info)
    assert data["memory"]["vae_tiling"] == "auto" and data["memory"]["offloaded_models"] == ["big"]
    assert "memory" not in info_dict(pb.GetServerInfoResponse(version="1"))
    assert not [x for x in info_lines(pb.GetServerInfoResponse()) if x.startswith("memory")]


def test_info_shows_the_families() -> None:
    info = pb.GetServerInfoResponse(
        families=[
            pb.FamilyInfo(name="sd15", pipeline_classes=["StableDiffusionPipeline"]),
            pb.FamilyInfo(
                name="sdxl",
                pipeline_classes=["StableDiffusionXLPipeline"],
                fields=["params.prompt_2", "params.refiner"],
            ),
        ]
    )
    assert [x for x in info_lines(info) if x.startswith("family")] == [
        "family       sd15: StableDiffusionPipeline",
        "family       sdxl: StableDiffusionXLPipeline; its own fields: params.prompt_2, params.refiner",
    ]
    data = info_dict(info)
    assert data["families"][1] == {
        "name": "sdxl",
        "pipeline_classes": ["StableDiffusionXLPipeline"],
        "fields": ["params.prompt_2", "params.refiner"],
    }
    assert json.loads(json.dumps(data)) == data  # plain JSON values only
    assert not [x for x in info_lines(pb.GetServerInfoResponse()) if x.startswith("memory")]
