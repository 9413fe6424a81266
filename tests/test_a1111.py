"""The A1111-compatible REST subset against a real server over real HTTP: bodies as A1111 clients send them, the
same pixels as gRPC, png-info round trips, and every field honoured, ignored (with a header) or refused (422)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdserve import Client
from sdserve.types import SchedulerName
from tests.harness import TINY, ServerThread, pixels, png, running, sample_image, sample_mask, serving

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "a1111"
DOC = Path(__file__).resolve().parent.parent / "docs" / "a1111.md"


def base(srv: ServerThread) -> str:
    assert srv.server is not None
    return f"http://127.0.0.1:{srv.server.http_port}"


def call(
    srv: ServerThread, path: str, body: Any = None, key: str = "", raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, lower-cased headers, decoded JSON body) of one request; POST when there is a body."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base(srv) + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            status, head, text = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, head, text = err.code, dict(err.headers), err.read()
    return status, {k.lower(): v for k, v in head.items()}, json.loads(text) if text else None


def fixture(name: str, **replace: str) -> dict[str, Any]:
    """A body from tests/fixtures/a1111 with `$NAME` placeholders replaced."""
    text = (FIXTURES / name).read_text()
    for key, value in replace.items():
        text = text.replace(f"${key}", value)
    return dict(json.loads(text))


def data_url(img: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png(img)).decode()


def image_bytes(b64: str) -> bytes:
    return base64.b64decode(b64)


def locs(body: Any) -> list[list[Any]]:
    """The `loc` of every entry of a FastAPI-shaped 422 body."""
    return [entry["loc"] for entry in body["detail"]]


SMALL: dict[str, Any] = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def web(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, http_port=0, default_model=TINY, max_message_bytes=4 * 1024 * 1024)


def txt2img(srv: ServerThread, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    return call(srv, "/sdapi/v1/txt2img", body)


def info_of(answer: Any) -> dict[str, Any]:
    return dict(json.loads(answer["info"]))


@pytest.mark.parametrize("name", ["txt2img_full.json", "txt2img_webuiapi.json", "txt2img_bot.json"])
def test_client_bodies_run(web: ServerThread, name: str) -> None:
    body = fixture(name)
    status, headers, answer = txt2img(web, body)
    assert status == 200, answer
    assert "x-sdserve-ignored" not in headers, headers
    info = info_of(answer)
    assert len(answer["images"]) == body.get("batch_size", 1) == len(info["all_seeds"])
    assert Image.open(io.BytesIO(image_bytes(answer["images"][0]))).size == (64, 64)
    assert answer["parameters"]["prompt"] == body["prompt"]
    assert info["sd_model_name"] == TINY and info["prompt"] == body["prompt"]
    if body["seed"] == -1:
        assert 0 <= info["seed"] < 2**32 - 1  # A1111's random seed range
    else:
        assert info["all_seeds"][0] == body["seed"]


def test_txt2img_gives_grpcs_pixels(web: ServerThread) -> None:
    body = {**SMALL, "steps": 3, "negative_prompt": "grey", "cfg_scale": 5.5, "sampler_name": "Euler a"}
    status, _, answer = txt2img(web, body)
    assert status == 200, answer
    with Client(web.target) as c:
        direct = c.generate(
            "a red circle",
            negative_prompt="grey",
            steps=3,
            width=64,
            height=64,
            seed=7,
            guidance_scale=5.5,
            scheduler="EULER_ANCESTRAL",
            model=TINY,
        )
    assert np.array_equal(pixels(image_bytes(answer["images"][0])), pixels(direct.image.data))
    assert pixels(direct.image.data).std() > 0


@pytest.mark.parametrize(
    ("sampler", "schedule", "scheduler"),
    [
        ("Euler a", None, "EULER_ANCESTRAL"),
        ("k_euler", "Automatic", "EULER"),
        ("DPM++ 2M", None, "DPMPP_2M_KARRAS"),
        ("DPM++ 2M", "Uniform", "DPMPP_2M"),
        ("DPM++ 2M Karras", None, "DPMPP_2M_KARRAS"),
        ("PLMS", None, "PNDM"),
        ("UniPC", "automatic", "UNIPC"),
        ("EULER_ANCESTRAL", None, "EULER_ANCESTRAL"),
    ],
)
def test_sampler_names_map_onto_the_contract(web: ServerThread, sampler: str, schedule: str, scheduler: str) -> None:
    status, _, answer = txt2img(web, {**SMALL, "steps": 1, "sampler_name": sampler, "scheduler": schedule})
    assert status == 200, answer
    _, _, read = call(web, "/sdapi/v1/png-info", {"image": answer["images"][0]})
    assert json.loads(read["items"]["sdserve"])["scheduler"] == scheduler
    info = info_of(answer)
    assert (read["parameters"]["Sampler"], read["parameters"]["Schedule type"]) == (
        info["sampler_name"],
        info["scheduler"],
    )


def test_png_info_reads_back_the_parameters(web: ServerThread) -> None:
    body = {**SMALL, "prompt": "a tall, narrow tower", "negative_prompt": "fog", "sampler_name": "DPM++ 2M"}
    body |= {"scheduler": "Uniform", "cfg_scale": 6, "seed": 1234, "steps": 3}
    status, _, answer = txt2img(web, body)
    assert status == 200, answer
    status, _, read = call(web, "/sdapi/v1/png-info", {"image": "data:image/png;base64," + answer["images"][0]})
    assert status == 200, read
    assert read["info"] == info_of(answer)["infotexts"][0]
    p = read["parameters"]
    assert (p["Prompt"], p["Negative prompt"]) == ("a tall, narrow tower", "fog")
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"]) == ("3", "DPM++ 2M", "Uniform", "6")
    assert (p["Seed"], p["Size-1"], p["Size-2"], p["Model"]) == ("1234", "64", "64", TINY)
    _, _, models = call(web, "/sdapi/v1/sd-models")
    assert p["Model hash"] == next(m["hash"] for m in models if m["model_name"] == TINY)
    assert json.loads(read["items"]["sdserve"])["seed"] == 1234
    # The parameters run again give the same image.
    again = {**body, "prompt": p["Prompt"], "seed": int(p["Seed"]), "sampler_name": p["Sampler"]}
    assert txt2img(web, again)[2]["images"] == answer["images"]


def test_random_seed_is_reported_and_reproduces(web: ServerThread) -> None:
    _, _, first = txt2img(web, {**SMALL, "seed": -1})
    seed = info_of(first)["seed"]
    _, _, again = txt2img(web, {**SMALL, "seed": seed})
    assert again["images"] == first["images"]


def test_n_iter_runs_batches_with_following_seeds(web: ServerThread) -> None:
    status, _, answer = txt2img(web, {**SMALL, "seed": 100, "batch_size": 2, "n_iter": 2, "force_task_id": "loop"})
    assert status == 200, answer
    info = info_of(answer)
    assert info["all_seeds"] == [100, 101, 102, 103] and len(answer["images"]) == 4
    assert info["request_ids"] == ["loop", "loop-1"]


def test_send_images_false_returns_info_only(web: ServerThread) -> None:
    status, _, answer = txt2img(web, {**SMALL, "send_images": False})
    assert status == 200 and answer["images"] == [] and info_of(answer)["seed"] == 7


def test_img2img_inpaint_body_keeps_unmasked_pixels(web: ServerThread) -> None:
    init, mask = sample_image(64, 64, seed=3), sample_mask(64, 64)
    body = fixture("img2img_inpaint.json", INIT=data_url(init), MASK=data_url(mask))
    status, headers, answer = call(web, "/sdapi/v1/img2img", body)
    assert status == 200, answer
    assert "x-sdserve-ignored" not in headers
    out = pixels(image_bytes(answer["images"][0]))
    keep = np.asarray(mask) < 128
    assert np.array_equal(out[keep], np.asarray(init, dtype=np.int16)[keep])  # A1111 pastes the original back
    assert not np.array_equal(out, np.asarray(init, dtype=np.int16))
    assert answer["parameters"]["init_images"] is None and answer["parameters"]["mask"] is None
    assert info_of(answer)["denoising_strength"] == 0.75


def test_img2img_inpaint_only_masked_and_edit(web: ServerThread) -> None:
    init, mask = sample_image(64, 64, seed=5), sample_mask(64, 64)
    body = fixture("img2img_webuiapi.json", INIT=data_url(init))
    status, headers, answer = call(web, "/sdapi/v1/img2img", body)
    assert status == 200, answer
    assert headers["x-sdserve-ignored"] == "image_cfg_scale"
    assert info_of(answer)["all_seeds"] == [99]
    status, headers, masked = call(web, "/sdapi/v1/img2img", {**body, "mask": data_url(mask), "mask_blur": 0})
    assert status == 200, masked
    assert set(headers["x-sdserve-ignored"].split(",")) == {"image_cfg_scale", "inpainting_fill"}
    keep = np.asarray(mask) < 128
    out = pixels(image_bytes(masked["images"][0]))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[keep], np.asarray(init, dtype=np.int16)[keep])


def test_img2img_resizes_the_input_as_a1111(web: ServerThread) -> None:
    wide = data_url(sample_image(96, 64, seed=1))
    for mode in (0, 1, 2):
        body = {**SMALL, "init_images": [wide], "resize_mode": mode, "denoising_strength": 0.5}
        status, _, answer = call(web, "/sdapi/v1/img2img", body)
        assert status == 200, (mode, answer)
        assert Image.open(io.BytesIO(image_bytes(answer["images"][0]))).size == (64, 64)


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"width": 65}, ["body", "width"]),
        ({"cfg_scale": 99}, ["body", "cfg_scale"]),
        ({"batch_size": 99}, ["body", "batch_size"]),
        ({"steps": 0}, ["body", "steps"]),
        ({"steps": "many"}, ["body", "steps"]),
        ({"seed": -2}, ["body", "seed"]),
        ({"sampler_name": "DPM++ SDE"}, ["body", "sampler_name"]),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, ["body", "scheduler"]),
        ({"prompt": "x" * 5000}, ["body", "prompt"]),
        ({"prompt": "<lora:nope:1> a cat"}, ["body", "prompt"]),
        ({"force_task_id": "é" * 3}, ["body", "force_task_id"]),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 0}},
            ["body", "override_settings", "CLIP_stop_at_last_layers"],
        ),
    ],
)
def test_bad_values_are_422_naming_the_a1111_field(web: ServerThread, change: dict[str, Any], loc: list[Any]) -> None:
    status, _, answer = txt2img(web, {**SMALL, **change})
    if loc[-1] == "prompt" and "lora" in str(change):
        assert status == 404 and answer["detail"].startswith("prompt: adapter 'nope' not found"), answer
        return
    assert status == 422, answer
    assert loc in locs(answer), answer
    assert all(entry["msg"] for entry in answer["detail"])


@pytest.mark.parametrize(
    ("path", "change", "loc"),
    [
        ("img2img", {"denoising_strength": 0}, ["body", "denoising_strength"]),
        ("img2img", {"init_images": ["not base64!"]}, ["body", "init_images", 0]),
        ("img2img", {"init_images": ["https://example.com/a.png"]}, ["body", "init_images", 0]),
        ("img2img", {"init_images": []}, ["body", "init_images"]),
        ("img2img", {"mask": "data:image/png;base64,AAAA"}, ["body", "mask"]),
        ("png-info", {"image": "aGVsbG8="}, ["body", "image"]),
    ],
)
def test_bad_images_are_422_naming_the_field(
    web: ServerThread, path: str, change: dict[str, Any], loc: list[Any]
) -> None:
    body = {**SMALL, "init_images": [data_url(sample_image())], **change}
    status, _, answer = call(web, f"/sdapi/v1/{path}", body)
    assert status == 422, answer
    assert loc in locs(answer), answer


@pytest.mark.parametrize(
    "change",
    [
        {"enable_hr": True},
        {"restore_faces": True},
        {"tiling": True},
        {"script_name": "X/Y/Z plot"},
        {"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}},
        {"subseed_strength": 0.3},
        {"sampler_name": "DDIM", "eta": 1.0},
        {"sampler_name": "Euler a", "s_noise": 0.9},
        {"s_churn": 0.5},
        {"infotext": "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7"},
        {"override_settings": {"sd_vae": "vae-ft-mse-840000.safetensors"}},
        {"override_settings": {"eta_noise_seed_delta": 31337}},
        {"n_iter": 101},
    ],
)
def test_unsupported_fields_are_refused_naming_them(web: ServerThread, change: dict[str, Any]) -> None:
    status, _, answer = txt2img(web, {**SMALL, **change})
    assert status == 422, answer
    named = {".".join(str(p) for p in loc[1:]) for loc in locs(answer)}
    asked = set(change) - {"sampler_name"}
    for key in asked:
        value = change[key]
        expected = {f"{key}.{k}" for k in value} if isinstance(value, dict) else {key}
        assert expected <= named, (named, answer)


def test_inpainting_fill_latent_noise_needs_full_strength(web: ServerThread) -> None:
    body = {**SMALL, "init_images": [data_url(sample_image())], "mask": data_url(sample_mask()), "inpainting_fill": 2}
    status, _, answer = call(web, "/sdapi/v1/img2img", body)
    assert status == 422 and ["body", "inpainting_fill"] in locs(answer)
    status, _, answer = call(web, "/sdapi/v1/img2img", {**body, "denoising_strength": 1.0})
    assert status == 200, answer


def test_harmless_fields_are_ignored_with_a_header(web: ServerThread) -> None:
    body = {
        **SMALL,
        "styles": ["cinematic"],
        "save_images": True,
        "comments": {"note": "x"},
        "hr_upscaler": "Latent",  # hires fields are ignored silently while enable_hr is false, as A1111 does
        "cfg": 9,  # not an A1111 field
        "négatif": "x",  # nor this; named percent-encoded (headers are ASCII)
        "override_settings": {"sd_vae": "Automatic", "samples_format": "png", "img2img_color_correction": True},
        "alwayson_scripts": {"ControlNet": {"args": []}},
    }
    status, headers, answer = txt2img(web, body)
    assert status == 200, answer
    ignored = headers["x-sdserve-ignored"].split(",")
    expected = {
        "styles",
        "save_images",
        "comments",
        "cfg",
        "n%C3%A9gatif",
        "override_settings.img2img_color_correction",
    }
    assert set(ignored) == expected | {"alwayson_scripts.ControlNet"}


def test_models_are_chosen_by_name_title_or_file_name(web: ServerThread) -> None:
    _, _, models = call(web, "/sdapi/v1/sd-models")
    with Client(web.target) as c:
        listed, default = c.list_models()
    revisions = {m.name: m.revision for m in listed}
    assert {m["model_name"] for m in models} == set(revisions)
    tiny = next(m for m in models if m["model_name"] == TINY)
    assert tiny["hash"] == revisions[TINY][:10] and tiny["title"] == f"{TINY} [{tiny['hash']}]"
    _, _, options = call(web, "/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == tiny["title"] and default == TINY
    for name in (TINY, tiny["title"], f"{TINY}.safetensors"):
        status, _, answer = txt2img(web, {**SMALL, "override_settings": {"sd_model_checkpoint": name}})
        assert status == 200 and info_of(answer)["sd_model_hash"] == tiny["hash"], answer
    status, _, answer = txt2img(web, {**SMALL, "override_settings": {"sd_model_checkpoint": "nope [0123456789]"}})
    assert status == 404, answer
    assert answer["detail"].startswith("override_settings.sd_model_checkpoint: model 'nope' not found")


def test_listings_and_read_only_options(web: ServerThread) -> None:
    status, _, samplers = call(web, "/sdapi/v1/samplers")
    assert status == 200
    names = [s["name"] for s in samplers]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC", "LMS", "Heun", "PLMS"} <= set(names)
    _, _, schedulers = call(web, "/sdapi/v1/schedulers")
    assert [s["label"] for s in schedulers] == ["Automatic", "Uniform", "Karras"]
    _, _, options = call(web, "/sdapi/v1/options")
    status, _, _ = call(web, "/sdapi/v1/options", {"sd_model_checkpoint": options["sd_model_checkpoint"]})
    assert status == 200
    status, _, answer = call(web, "/sdapi/v1/options", {"sd_model_checkpoint": "other", "samples_format": "png"})
    assert status == 422 and locs(answer) == [["body", "sd_model_checkpoint"]]
    with Client(web.target) as c:
        info = c.server_info()
    loras = {a.name for a in info.adapters if a.kind == 1}  # ADAPTER_KIND_LORA
    assert {lora["name"] for lora in call(web, "/sdapi/v1/loras")[2]} == loras
    assert call(web, "/sdapi/v1/extra-single-image", {})[0] == 404


def test_a_body_over_the_message_limit_is_413(web: ServerThread) -> None:
    status, _, answer = call(web, "/sdapi/v1/txt2img", raw=b" " * (4 * 1024 * 1024 + 1))
    assert status == 413 and "max_message_bytes" in answer["detail"]


def test_api_keys_guard_sdapi(models_dir: Path) -> None:
    with serving(models_dir, http_port=0, api_keys=("k1",)) as srv:
        status, _, answer = call(srv, "/sdapi/v1/sd-models")
        assert status == 401 and "API key" in answer["detail"]
        assert call(srv, "/sdapi/v1/txt2img", SMALL, key="wrong")[0] == 401
        status, _, answer = call(srv, "/sdapi/v1/txt2img", SMALL, key="k1")
        assert status == 200, answer


def test_the_doc_curl_examples_run(web: ServerThread, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = re.search(r"<!-- a1111-curl-examples.*?```bash\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/a1111.md lost its curl examples"
    script = block.group(1).replace('"width": 512', '"width": 64').replace('"height": 512', '"height": 64')
    script = script.replace('"steps": 20', '"steps": 2')
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={"SDSERVE_HTTP": base(web), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert '"model_name":"tiny-sd"' in out and '"name":"Euler a"' in out
    assert '"Sampler":"DPM++ 2M"' in out and '"Schedule type":"Karras"' in out
    assert json.loads((tmp_path / "img2img.json").read_text())["images"]
    assert '"job_count":0' in out and out.rstrip().endswith("{}")


@pytest.mark.parametrize(
    ("scheduler", "written"),
    [("EULER_ANCESTRAL", "Sampler: Euler a, CFG"), ("DPMPP_2M_KARRAS", "Sampler: DPM++ 2M, Schedule type: Karras, CFG"),
     ("DPMPP_2M", "Sampler: DPM++ 2M, Schedule type: Uniform, CFG"), ("DDIM", "Sampler: DDIM, CFG")],
)  # fmt: skip
def test_every_images_infotext_names_the_sampler_as_a1111_does(
    web: ServerThread, scheduler: SchedulerName, written: str
) -> None:
    """A gRPC result's PNG carries A1111's sampler names, which A1111's own tools and image browsers parse."""
    with Client(web.target) as c:
        result = c.generate("a cat", steps=2, seed=1, width=64, height=64, scheduler=scheduler, model=TINY)
    text = Image.open(io.BytesIO(result.images[0].data)).info["parameters"]
    assert written in text.splitlines()[-1], text


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/sdapi/v1/txt2img", b'{"prompt": "a\\ud800", "steps": 2}', "prompt"),
        ("/sdapi/v1/txt2img", b'{"prompt": "a", "override_settings": {"sd_model_checkpoint": "\\udc00"}}',
         "override_settings.sd_model_checkpoint"),
        ("/sdapi/v1/txt2img", b'{"prompt": "a", "styles": ["\\udc00"]}', "styles.0"),
        ("/sdapi/v1/png-info", b'{"image": "\\udc00"}', "image"),
    ],
)  # fmt: skip
def test_text_json_cannot_carry_as_utf8_is_422_naming_the_field(
    web: ServerThread, path: str, raw: bytes, field: str
) -> None:
    """A lone surrogate escape is valid JSON but not text: it was a 500 (the contract's strings are UTF-8)."""
    status, _, body = call(web, path, raw=raw)
    assert status == 422, body
    assert any(f"{field}: must be valid UTF-8" in e["msg"] for e in body["detail"]), body
