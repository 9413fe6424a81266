"""Unit rules: names, settings, file selection, safetensors checks and store paths."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

from model_manager.layout import StoreLayout
from model_manager.names import hub_revision_problem, name_problem, repo_id_problem
from model_manager.selection import SelectionError, select
from model_manager.settings import Settings, parse_size
from model_manager.weights import BadWeights, looks_pickled, read_header

BASE = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
]
WEIGHTS = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


@pytest.mark.parametrize("name", ["tiny-sd", "a", "SD_1.5", "x" * 100, "0abc"])
def test_valid_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["", "..", "a/b", "a\\b", "../x", ".hidden", "-x", "a..b", "x" * 101, "a b", "é"])
def test_invalid_names(name: str) -> None:
    assert name_problem(name)


def test_repo_ids_and_revisions() -> None:
    assert repo_id_problem("stable-diffusion-v1-5/stable-diffusion-inpainting") is None
    assert repo_id_problem("gpt2") is None
    for bad in ("", "a/b/c", "../x", "a/..", "a/ b", "/abs"):
        assert repo_id_problem(bad), bad
    assert hub_revision_problem("refs/pr/1") is None
    assert hub_revision_problem("main") is None
    assert hub_revision_problem("a b")
    assert hub_revision_problem("../x")


def test_sizes_and_settings_precedence() -> None:
    assert parse_size("123") == 123
    assert parse_size("500M") == 500 * 1024**2
    assert parse_size("20GiB") == 20 * 1024**3
    assert parse_size("1.5G") == int(1.5 * 1024**3)
    with pytest.raises(ValueError):
        parse_size("lots")
    env = {"HF_ENDPOINT": "http://hub.example", "HF_TOKEN": "secret", "SDSERVE_MANAGER_MAX_STORE_BYTES": "2G"}
    s = Settings.from_sources([], env)
    assert (s.hf_endpoint, s.hf_token, s.max_store_bytes) == ("http://hub.example", "secret", 2 * 1024**3)
    assert s.redacted()["hf_token"] == "<set>"
    env["SDSERVE_MANAGER_HF_ENDPOINT"] = "http://mirror.example"
    assert Settings.from_sources([], env).hf_endpoint == "http://mirror.example"
    assert Settings.from_sources(["--hf-endpoint", "http://flag.example"], env).hf_endpoint == "http://flag.example"
    with pytest.raises(SystemExit):
        Settings.from_sources(["--verify-on-start", "sometimes"], {})
    with pytest.raises(SystemExit):
        Settings.from_sources([], {"SDSERVE_MANAGER_PORT": "many"})


def test_selection_takes_safetensors_only() -> None:
    chosen = select([*BASE, *WEIGHTS, "unet/diffusion_pytorch_model.bin", "v1-5.ckpt", "safety_checker/model.bin"])
    assert chosen.variant is None
    assert {p.dest for p in chosen.picks} == set(BASE + WEIGHTS)
    fp16 = [w.replace(".safetensors", ".fp16.safetensors") for w in WEIGHTS]
    chosen = select([*BASE, *WEIGHTS, *fp16], prefer="fp16")
    assert chosen.variant == "fp16"
    assert {p.source for p in chosen.picks} >= set(fp16) and {p.dest for p in chosen.picks} >= set(WEIGHTS)
    # fp16 only where every component has it.
    assert select([*BASE, *WEIGHTS, fp16[0]], prefer="fp16").variant is None
    shards = ["unet/diffusion_pytorch_model-00001-of-00002.safetensors",
              "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
              "unet/diffusion_pytorch_model.safetensors.index.json"]  # fmt: skip
    chosen = select([*BASE, *shards, *WEIGHTS[1:]])
    assert set(shards) <= {p.dest for p in chosen.picks}
    with pytest.raises(SelectionError, match="only pickled weights"):
        select([*BASE, "unet/diffusion_pytorch_model.bin", *WEIGHTS[1:]])
    with pytest.raises(SelectionError, match=r"missing model_index\.json"):
        select([*BASE[1:], *WEIGHTS])


def _safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_safetensors_headers_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(_safetensors(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8))
    assert "t" in read_header(good)
    cases = {
        "truncated": _safetensors(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4),
        "trailing bytes": _safetensors(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 12),
        "not JSON": _safetensors(b"\xff\xfe", b""),
        "inconsistent offsets": _safetensors(b'{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8),
        "too short": b"\1\2",
    }
    for what, content in cases.items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(content)
        with pytest.raises(BadWeights, match=what):
            read_header(path)
    pickled = tmp_path / "p.safetensors"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    assert looks_pickled(pickled) and not looks_pickled(good)


def test_store_paths_stay_inside_the_store(tmp_path: Path) -> None:
    layout = StoreLayout(tmp_path)
    assert layout.variant_dir("a", "0123abcd", "fp16") == tmp_path.resolve() / "models" / "a" / "0123abcd" / "fp16"
    for parts in (("..", "r", "fp32"), ("a", "../..", "fp32"), ("a", "r", "/etc"), ("a/b", "r", "fp32")):
        with pytest.raises(ValueError):
            layout.variant_dir(*parts)


def test_every_setting_is_documented() -> None:
    import dataclasses

    readme = (Path(__file__).resolve().parents[2] / "model_manager" / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert f"| `{flag}` | `SDSERVE_MANAGER_{f.name.upper()}`" in readme, flag
