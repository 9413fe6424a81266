"""Per-request adapters through a real server: LoRAs (diffusers and kohya layouts) and textual-inversion embeddings
made here for the tiny model, served over real gRPC stubs and compared with direct diffusers calls.

Tolerance of the parity checks: every pixel within 1/255 of the direct diffusers result (in practice identical: both
paths run the same fp32 CPU kernels over the same peft layers with the same generators)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from tests import adapter_models as am
from tests.harness import TINY, ServerThread, pixels, running, serving

TOLERANCE = 1
STEPS = 3
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def adapters(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    state = am.make_lora(models_dir / TINY, root / "both", seed=1)
    am.make_lora(models_dir / TINY, root / "unet-only", text=False, seed=2)
    am.make_lora(models_dir / TINY, root / "text-only", unet=False, seed=3)
    am.make_kohya(state, root / "both-kohya")
    am.make_embedding(root / "tok", "<tok>", 2, 32)
    # An SDXL-shaped LoRA (its second text encoder is 1280 wide): another family than the tiny SD model.
    am.publish(
        root / "xl",
        {
            "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 1280),
            "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1280, 4),
        },
    )
    return root


@pytest.fixture(scope="module")
def srv(models_dir: Path, adapters: Path) -> Iterator[ServerThread]:
    # No prompt cache: a text-encoder LoRA that stayed active would show in the next request's embeddings.
    yield from running(models_dir, adapter_dirs=(adapters,), prompt_cache_bytes=0)


@pytest.fixture(scope="module")
def stub(srv: ServerThread) -> Iterator[pb_grpc.DiffusionServiceStub]:
    with grpc.insecure_channel(srv.target) as channel:
        yield pb_grpc.DiffusionServiceStub(channel)


def params(prompt: str = PROMPT, loras: tuple[tuple[str, float | None], ...] = (), **kw: Any) -> pb.GenerationParams:
    p = pb.GenerationParams(prompt=prompt, steps=STEPS, seed=7, model=TINY, **kw)
    for name, scale in loras:
        ref = p.adapters.add(name=name)
        if scale is not None:
            ref.scale = scale
    return p


def generate(stub: pb_grpc.DiffusionServiceStub, p: pb.GenerationParams) -> tuple[pb.StartedEvent, pb.ResultEvent]:
    started = None
    for event in stub.Generate(pb.GenerateRequest(params=p)):
        if event.HasField("started"):
            started = event.started
        if event.HasField("result"):
            assert started is not None
            return started, event.result
    raise AssertionError("no result")


def image(stub: pb_grpc.DiffusionServiceStub, p: pb.GenerationParams) -> np.ndarray:
    return pixels(generate(stub, p)[1].images[0].data)


def refusal(stub: pb_grpc.DiffusionServiceStub, p: pb.GenerationParams) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, p)
    return info.value


_DIRECT: dict[str, Any] = {}


def direct(models_dir: Path, adapters: Path, loras: list[tuple[str, float]], prompt: str = PROMPT) -> np.ndarray:
    """The image of a direct diffusers call with the same LoRAs loaded by diffusers itself."""
    pipe = _DIRECT.get("pipe")
    if pipe is None:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            models_dir / TINY, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        _DIRECT["pipe"] = pipe
    for name, _ in loras:
        if name not in {n for names in pipe.get_list_adapters().values() for n in names}:
            pipe.load_lora_weights(str(adapters / name), weight_name="adapter.safetensors", adapter_name=name)
    if loras:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
    else:
        pipe.disable_lora()
    g = [torch.Generator("cpu").manual_seed(7)]
    out = pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="pil").images[0]
    pipe.disable_lora()
    return np.asarray(out.convert("RGB"), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= TOLERANCE


def test_a_lora_changes_the_image_and_leaves_the_next_request_alone(
    stub: pb_grpc.DiffusionServiceStub, models_dir: Path
) -> None:
    before = generate(stub, params())[1].images[0].data
    for name in ("both", "unet-only", "text-only", "both-kohya"):
        with_lora = image(stub, params(loras=((name, 1.0),)))
        assert not close(with_lora, pixels(before)), name
        after = generate(stub, params())[1].images[0].data
        assert after == before, f"the request after a {name} request changed"
    # And a server that never loaded an adapter makes the same bytes.
    with serving(models_dir, adapter_dirs=(), prompt_cache_bytes=0) as fresh, grpc.insecure_channel(fresh.target) as ch:
        assert generate(pb_grpc.DiffusionServiceStub(ch), params())[1].images[0].data == before


@pytest.mark.parametrize(
    "loras", [[("both", 1.0)], [("both", 0.5)], [("both", 0.7), ("unet-only", 1.3)], [("text-only", -1.0)]]
)
def test_loras_match_direct_diffusers(
    stub: pb_grpc.DiffusionServiceStub, models_dir: Path, adapters: Path, loras: list[tuple[str, float]]
) -> None:
    served = image(stub, params(loras=tuple(loras)))
    assert close(served, direct(models_dir, adapters, loras))


def test_kohya_layout_makes_the_diffusers_layouts_images(stub: pb_grpc.DiffusionServiceStub) -> None:
    for scale in (1.0, 0.6):
        assert close(image(stub, params(loras=(("both-kohya", scale),))), image(stub, params(loras=(("both", scale),))))


def test_scale_zero_is_the_plain_image(stub: pb_grpc.DiffusionServiceStub) -> None:
    started, result = generate(stub, params(loras=(("both", 0.0),)))
    assert np.array_equal(pixels(result.images[0].data), image(stub, params()))
    assert [(a.name, a.scale) for a in started.adapters] == [("both", 0.0)]


def test_inline_tags_are_adapters(stub: pb_grpc.DiffusionServiceStub) -> None:
    started, result = generate(stub, params(prompt=f"{PROMPT} <lora:both:0.5>"))
    assert [(a.name, a.scale, a.kind) for a in started.adapters] == [("both", 0.5, pb.ADAPTER_KIND_LORA)]
    assert result.parameters.prompt == f"{PROMPT} "
    assert [a.name for a in result.parameters.adapters] == ["both"]
    assert len(result.parameters.adapters[0].sha256) == 64
    explicit = image(stub, params(prompt=f"{PROMPT} ", loras=(("both", 0.5),)))
    assert np.array_equal(pixels(result.images[0].data), explicit)
    # The A1111 text in the PNG keeps the tag and the hash, so A1111 tools re-run it.
    text = _png_parameters(result.images[0].data)
    assert "<lora:both:0.5>" in text and 'Lora hashes: "both: ' in text


def _png_parameters(data: bytes) -> str:
    import io

    from PIL import Image

    return str(Image.open(io.BytesIO(data)).info.get("parameters", ""))


def test_an_embedding_is_used_by_its_token(stub: pb_grpc.DiffusionServiceStub) -> None:
    started, result = generate(stub, params(prompt="a <tok> circle"))
    assert [(a.name, a.kind, a.token) for a in started.adapters] == [
        ("tok", pb.ADAPTER_KIND_TEXTUAL_INVERSION, "<tok>")
    ]
    assert not close(pixels(result.images[0].data), image(stub, params(prompt="a circle")))
    assert not generate(stub, params(prompt="a tok circle"))[0].adapters


@pytest.mark.parametrize(
    ("p", "code", "field"),
    [
        (params(loras=(("nope", 1.0),)), grpc.StatusCode.NOT_FOUND, "params.adapters[0].name"),
        (params(prompt="x <lora:nope:1>"), grpc.StatusCode.NOT_FOUND, "params.prompt"),
        (params(loras=(("both", 4.5),)), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters[0].scale"),
        (params(loras=(("both", float("nan")),)), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters[0].scale"),
        (params(loras=(("", 1.0),)), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters[0].name"),
        (params(loras=(("both", 1.0), ("both", 0.5))), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters[1].name"),
        (params(prompt="x <lora:both:1>", loras=(("both", 1.0),)), grpc.StatusCode.INVALID_ARGUMENT, "params.prompt"),
        (params(prompt="x <lora:both:abc>"), grpc.StatusCode.INVALID_ARGUMENT, "params.prompt"),
        (params(negative_prompt="<lora::1>"), grpc.StatusCode.INVALID_ARGUMENT, "params.negative_prompt"),
        (params(loras=(("tok", 1.0),)), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters[0].name"),
        (params(loras=tuple((f"a{i}", 1.0) for i in range(9))), grpc.StatusCode.INVALID_ARGUMENT, "params.adapters"),
        (params(loras=(("xl", 1.0),)), grpc.StatusCode.FAILED_PRECONDITION, "params.adapters[0].name"),
    ],
)
def test_bad_adapters_are_refused_naming_the_field(
    stub: pb_grpc.DiffusionServiceStub, p: pb.GenerationParams, code: grpc.StatusCode, field: str
) -> None:
    err = refusal(stub, p)
    assert err.code() == code
    assert field in (err.details() or "")


def test_another_family_names_both(stub: pb_grpc.DiffusionServiceStub) -> None:
    details = refusal(stub, params(loras=(("xl", 1.0),))).details() or ""
    assert "sdxl" in details and "sd15" in details and "cross_attention_dim=32" in details


def test_a_corrupt_file_is_refused_and_the_server_goes_on(models_dir: Path, adapters: Path, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(adapters / "both", root / "bad")
    weights = root / "bad" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with serving(models_dir, adapter_dirs=(root,)) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        err = refusal(stub, params(loras=(("bad", 1.0),)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sha256" in (err.details() or "")
        generate(stub, params())


def test_requests_share_a_call_only_with_the_same_adapters(srv: ServerThread) -> None:
    import concurrent.futures

    asked = [(), (("both", 1.0),), (("both", 0.5),), (("both", 1.0),), (), (("unet-only", 1.0),)]
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
            results = list(pool.map(lambda loras: generate(stub, params(loras=loras)), asked))
    by_set: dict[tuple[tuple[str, float], ...], list[np.ndarray]] = {}
    for loras, (started, result) in zip(asked, results, strict=True):
        assert [(a.name, a.scale) for a in started.adapters] == [(n, s) for n, s in loras]
        by_set.setdefault(loras, []).append(pixels(result.images[0].data))
    # Equal sets make equal images whether or not they shared a call; different sets never mixed.
    for images in by_set.values():
        assert all(np.array_equal(images[0], i) for i in images)
    assert len({v[0].tobytes() for v in by_set.values()}) == len(by_set)


def test_the_prompt_cache_keys_on_text_encoder_adapters(models_dir: Path, adapters: Path) -> None:
    with serving(models_dir, adapter_dirs=(adapters,)) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        plain = image(stub, params())
        text_only = image(stub, params(loras=(("text-only", 1.0),)))
        assert not close(plain, text_only)
        assert np.array_equal(image(stub, params()), plain)
        assert np.array_equal(image(stub, params(loras=(("text-only", 1.0),))), text_only)


def test_server_info_and_metrics(stub: pb_grpc.DiffusionServiceStub, srv: ServerThread) -> None:
    generate(stub, params(loras=(("both", 1.0),)))
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    found = {a.name: a for a in info.adapters}
    assert {"both", "both-kohya", "unet-only", "text-only", "tok", "xl"} <= set(found)
    both = found["both"]
    assert (both.kind, both.family, both.base) == (pb.ADAPTER_KIND_LORA, "sd15", "cross_attention_dim=32,text_width=32")
    assert list(both.targets) == ["text_encoder", "unet"] and TINY in both.loaded_in
    assert found["tok"].token == "<tok>" and found["xl"].family == "sdxl"
    assert info.limits.max_adapters == 8
    assert srv.server is not None
    registry = srv.server.metrics.registry
    assert (registry.get_sample_value("sdserve_adapter_lookups_total", {"result": "hit"}) or 0) >= 1
    assert (registry.get_sample_value("sdserve_adapter_pool_bytes") or 0) > 0


def test_the_pool_stays_within_its_bytes(models_dir: Path, adapters: Path) -> None:
    one = sum(t.numel() * 4 for t in am.load_state(adapters / "both").values())
    with serving(models_dir, adapter_dirs=(adapters,), adapter_pool_bytes=one) as s:
        with grpc.insecure_channel(s.target) as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            first = image(stub, params(loras=(("both", 1.0),)))
            image(stub, params(loras=(("unet-only", 1.0),)))
            assert np.array_equal(image(stub, params(loras=(("both", 1.0),))), first)
        assert s.server is not None
        registry = s.server.metrics.registry
        assert (registry.get_sample_value("sdserve_adapter_evictions_total") or 0) >= 2
        assert s.server.adapter_pool.bytes <= one


def test_an_adapter_added_while_serving_is_found(models_dir: Path, adapters: Path, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    with serving(models_dir, adapter_dirs=(root,)) as s, grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        assert refusal(stub, params(loras=(("late", 1.0),))).code() == grpc.StatusCode.NOT_FOUND
        staged = tmp_path / "staged"
        shutil.copytree(adapters / "unet-only", staged)
        staged.rename(root / "late")
        assert generate(stub, params(loras=(("late", 1.0),)))[0].adapters[0].name == "late"


def test_pickle_named_weights_are_never_loaded(tmp_path: Path) -> None:
    from sdserve_core.adapter_file import AdapterFormatError, inspect

    path = tmp_path / "x.ckpt"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(AdapterFormatError, match="pickle"):
        inspect(path)


def test_a_lora_on_int8_weights_is_refused(adapters: Path) -> None:
    from service.adapters import AdapterCatalog, AdapterUnusable, resolve
    from service.requests import AdapterRequest, GenerationRequest, Task

    catalog = AdapterCatalog([adapters])
    base = "cross_attention_dim=32,text_width=32"
    req = GenerationRequest(Task.GENERATE, TINY, "a <tok> circle", adapters=(AdapterRequest("both", 1.0, "f"),))
    assert [u.name for u in resolve(catalog, req, "sd15", base, "fp32")] == ["both", "tok"]
    with pytest.raises(AdapterUnusable, match="int8"):
        resolve(catalog, req, "sd15", base, "int8")
    # Embeddings need no float weights: they go on int8 models too.
    only_token = GenerationRequest(Task.GENERATE, TINY, "a <tok> circle")
    assert [u.name for u in resolve(catalog, only_token, "sd15", base, "int8")] == ["tok"]


def test_scale_zero_keeps_the_models_execution_profile(models_dir: Path, adapters: Path) -> None:
    """A call whose LoRAs are all at scale 0 is a plain call: it runs the model's profile (here the ONNX UNet), so its
    image is the plain image to the bit; a LoRA that changes the call runs the torch UNet (no export holds it)."""
    from sdserve import Client

    settings: dict[str, Any] = {"execution_profile": "onnxruntime", "calibrate_batching": False}
    with serving(models_dir, adapter_dirs=(adapters,), prompt_cache_bytes=0, **settings) as s, Client(s.target) as c:
        ask: dict[str, Any] = {"steps": STEPS, "seed": 7, "model": TINY}
        # The LoRA first: the UNet's export, made for the first plain call, is of a UNet with peft layers in it.
        one = c.generate(PROMPT, adapters=[("both", 1.0), ("unet-only", 0.0)], **ask)
        plain = c.generate(PROMPT, **ask)
        zero = c.generate(PROMPT, adapters=[("both", 0.0), ("unet-only", 0.0)], **ask)
        again = c.generate(PROMPT, **ask)
    with serving(models_dir, **settings) as s, Client(s.target) as c:
        never = c.generate(PROMPT, **ask)
    assert np.array_equal(pixels(plain.image.data), pixels(never.image.data)), "as from a server without LoRAs"
    assert (plain.execution_profile, zero.execution_profile, one.execution_profile) == ("onnxruntime",) * 2 + ("exact",)
    assert np.array_equal(pixels(zero.image.data), pixels(plain.image.data))
    assert np.array_equal(pixels(again.image.data), pixels(plain.image.data))
    assert not close(pixels(one.image.data), pixels(plain.image.data))
