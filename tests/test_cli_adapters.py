"""The CLI's --lora flag without a server: parsing into the `adapters` option, usage errors naming --lora, and the
adapters in the started line, the --json report and `sdserve info`."""

from __future__ import annotations

import json

import pytest

from sdserve import ResolvedAdapter, Result, Started, Timings
from sdserve.cli import _options, _result_dict, _started_line, build_parser, info_dict, info_lines
from sdserve.types import GenerationOptions
from sdserve.v1 import diffusion_pb2 as pb

SHA = "0123456789abcdef" * 4
BASE = {
    "generate": [],
    "edit": ["--image", "i.png"],
    "inpaint": ["--image", "i.png", "--mask", "m.png"],
}


def _parse(*args: str, command: str = "generate") -> GenerationOptions:
    ns = build_parser({}).parse_args([command, *BASE[command], "--prompt", "p", "--out", "o.png", *args])
    return _options(ns)


@pytest.mark.parametrize("command", sorted(BASE))
def test_lora_flags_become_the_adapters_option(command: str) -> None:
    opts = _parse("--lora", "pink", "--lora", "cyan:0.5", "--lora=neg:-1.25", command=command)
    assert opts == {"adapters": [("pink", None), ("cyan", 0.5), ("neg", -1.25)]}


def test_no_lora_sends_no_adapters() -> None:
    assert "adapters" not in _parse("--steps", "3")


def test_lora_scale_bounds_and_forms() -> None:
    opts = _parse("--lora", "a:4", "--lora", "b:-4", "--lora", "c:0", "--lora", "d:1e-1", "--lora", "e:+2")
    assert opts["adapters"] == [("a", 4.0), ("b", -4.0), ("c", 0.0), ("d", 0.1), ("e", 2.0)]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "(no NAME)"),
        (":1", "(no NAME)"),
        (" :1", "(no NAME)"),
        ("pink:", "(SCALE is not a number)"),
        ("pink:x", "(SCALE is not a number)"),
        ("pink:1:2", "(SCALE is not a number)"),
        ("pink:4.5", ""),
        ("pink:-4.001", ""),
        ("pink:nan", ""),
        ("pink:inf", ""),
    ],
)
@pytest.mark.parametrize("command", sorted(BASE))
def test_bad_lora_is_a_usage_error_naming_the_flag(
    command: str, value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser({}).parse_args([command, *BASE[command], "--prompt", "p", "--out", "o.png", f"--lora={value}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"sdserve {command}: error: argument --lora: must be NAME or NAME:SCALE with SCALE from -4 to 4, got "
    assert lines[0].startswith(prefix + repr(value)), lines
    assert why in lines[0]


def test_the_same_lora_twice_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser({}).parse_args(["generate", "--prompt", "p", "--out", "o", "--lora", "a", "--lora", "a:0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdserve generate: error: argument --lora: names 'a' twice"), err


def test_help_describes_lora(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["inpaint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora NAME[:SCALE]" in text
    assert "from -4 to 4 (default 1)" in text


LORA = ResolvedAdapter(name="pink", kind="lora", scale=0.5, sha256=SHA)
EMBEDDING = ResolvedAdapter(name="ti", kind="textual_inversion", scale=1.0, sha256=SHA, token="<ti>")


def test_started_line_names_the_adapters() -> None:
    ev = Started(seeds=(1,), model="shapes", model_revision="r" * 40, request_id="x", queue_seconds=0, batch_size=1)
    assert "adapters" not in _started_line(ev)
    with_adapters = Started(
        seeds=(1,),
        model="shapes",
        model_revision="r" * 40,
        request_id="x",
        queue_seconds=0,
        batch_size=1,
        adapters=(LORA, EMBEDDING),
    )
    assert _started_line(with_adapters) == (
        f"started on shapes@{'r' * 10} + adapters pink:0.5@{SHA[:10]}, ti (<ti>)@{SHA[:10]} seeds [1]"
    )


def test_json_report_holds_the_adapters() -> None:
    result = Result(
        images=(),
        parameters={"adapters": [{"name": "pink"}]},
        timings=Timings(0, 0, 0, 0, 0, 0, 0),
        request_id="r",
        adapters=(LORA,),
    )
    report = json.loads(json.dumps(_result_dict(result, [])))
    assert report["adapters"] == [{"name": "pink", "kind": "lora", "scale": 0.5, "sha256": SHA, "token": ""}]
    assert report["parameters"]["adapters"] == [{"name": "pink"}]


def test_info_lists_adapters_and_the_limit() -> None:
    info = pb.GetServerInfoResponse(
        limits=pb.Limits(max_adapters=8),
        adapters=[
            pb.AdapterInfo(
                name="pink",
                kind=pb.ADAPTER_KIND_LORA,
                family="sd15",
                base="cross_attention_dim=768",
                sha256=SHA,
                size_bytes=2048,
                targets=["unet"],
                loaded_in=["shapes"],
            ),
            pb.AdapterInfo(name="ti", kind=pb.ADAPTER_KIND_TEXTUAL_INVERSION, family="sd15", token="<ti>"),
        ],
    )
    lines = info_lines(info)
    assert any(" 8 adapters" in x for x in lines if x.startswith("requests")), lines
    adapters = [x for x in lines if x.startswith("adapter ")]
    assert len(adapters) == 2, lines
    assert adapters[0].startswith("adapter      pink: lora for sd15 (cross_attention_dim=768), unet, ")
    assert adapters[0].endswith(f"sha256 {SHA[:12]}; loaded in shapes")
    assert adapters[1].startswith("adapter      ti: embedding <ti> for sd15 (-), -, ")
    data = info_dict(info)
    assert json.loads(json.dumps(data)) == data  # plain JSON values only
    assert data["limits"]["max_adapters"] == 8
    assert data["adapters"][0] == {
        "name": "pink",
        "kind": "lora",
        "family": "sd15",
        "base": "cross_attention_dim=768",
        "token": "",
        "sha256": SHA,
        "size_bytes": 2048,
        "targets": ["unet"],
        "loaded_in": ["shapes"],
    }
    assert info_dict(pb.GetServerInfoResponse())["adapters"] == []
    assert not [x for x in info_lines(pb.GetServerInfoResponse()) if x.startswith("adapter ")]
