"""Valid input never reaches INTERNAL or UNKNOWN: clip skip works as diffusers means it, per-scheduler step limits,
MASK_ONLY crop geometry, float32 strengths, undecodable bytes at both servers' edge, and honest outcome labels."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from sdserve import Client, SdserveError
from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import model_manager_pb2 as mm
from service import schedulers
from tests.harness import TINY, TINY_INPAINT, ServerThread, pixels, png, requests_counted, sample_image
from tests.test_equivalence import _PIPES, assert_same, direct
from tests.test_validation import expect

ALL_SCHEDULERS = list(schedulers.SCHEDULERS)


# ---- clip skip --------------------------------------------------------------------------------------------------


def skipped_embeds(models_dir: Path, prompt: str, clip_skip: int) -> torch.Tensor:
    """What diffusers' encode_prompt(clip_skip=k) means: hidden state k layers before the last, then the final norm."""
    direct(models_dir, TINY, "generate", "DDIM", prompt="warm", num_inference_steps=1, seed=0)
    pipe = _PIPES[(TINY, "generate")]
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipe.text_encoder.final_layer_norm(hidden)  # type: ignore[no-any-return]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers_intent(client: Client, models_dir: Path, clip_skip: int) -> None:
    ask: dict[str, Any] = {"steps": 3, "seed": 5, "guidance_scale": 7.0, "scheduler": "DDIM"}
    served = client.generate("a red circle", negative_prompt="blue", clip_skip=clip_skip, **ask)
    plain = client.generate("a red circle", negative_prompt="blue", **ask)
    assert int(np.abs(pixels(served.image.data) - pixels(plain.image.data)).max()) > 0, "clip skip changed nothing"
    expected = direct(
        models_dir, TINY, "generate", "DDIM",
        prompt_embeds=skipped_embeds(models_dir, "a red circle", clip_skip), negative_prompt="blue",
        num_inference_steps=3, guidance_scale=7.0, seed=5, height=64, width=64,
    )  # fmt: skip
    assert_same([pixels(served.image.data)], expected)
    assert served.parameters["clip_skip"] == clip_skip


def test_clip_skip_works_in_every_task(client: Client) -> None:
    image = png(sample_image())
    client.edit(image, "x", clip_skip=1, steps=2, seed=1)
    client.inpaint(image, png(Image.new("L", (64, 64), 255)), "x", clip_skip=1, steps=2, seed=1, model=TINY_INPAINT)


# ---- steps per scheduler -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_every_scheduler_at_its_step_limit_runs_and_one_more_is_refused(client: Client, scheduler: str) -> None:
    limit = min(150, schedulers.max_steps(scheduler, {"num_train_timesteps": 1000}))
    # Guidance 1 skips the unconditional pass: half the cost of the 150-step runs.
    result = client.generate(
        "x",
        steps=limit,
        seed=1,
        scheduler=scheduler,  # type: ignore[arg-type]
        width=8,
        height=8,
        guidance_scale=1.0,
    )
    assert result.parameters["steps"] == limit
    if limit < 150:
        expect(
            lambda: client.generate("x", steps=limit + 1, scheduler=scheduler),  # type: ignore[arg-type]
            "INVALID_ARGUMENT", "params.steps", f"at most {limit} with scheduler {scheduler}",
        )  # fmt: skip


def test_lcm_edit_steps_are_limited_too(client: Client) -> None:
    image = png(sample_image())
    expect(
        lambda: client.edit(image, "x", steps=120, scheduler="LCM", strength=0.3), "INVALID_ARGUMENT", "params.steps"
    )
    client.edit(image, "x", steps=50, scheduler="LCM", strength=0.3, seed=2)


# ---- MASK_ONLY geometry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(8, 1024), (1024, 8), (9, 2000)])
def test_mask_only_on_a_thin_image_is_refused_naming_the_area(client: Client, width: int, height: int) -> None:
    image = png(Image.new("RGB", (width, height), (90, 120, 200)))
    mask = png(Image.new("L", (width, height), 255))
    err = expect(
        lambda: client.inpaint(image, mask, "x", area="mask_only", steps=2, model=TINY_INPAINT),
        "INVALID_ARGUMENT", "area", "less than one pixel",
    )  # fmt: skip
    assert f"{width}x{height}" in err.message


@pytest.mark.parametrize(("width", "height", "box"), [(16, 512, (0, 0, 16, 512)), (96, 40, (10, 5, 30, 20))])
def test_mask_only_on_odd_shapes_that_fit_runs(client: Client, width: int, height: int, box: tuple[int, ...]) -> None:
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = 255
    image = png(Image.new("RGB", (width, height), (90, 120, 200)))
    result = client.inpaint(image, png(Image.fromarray(arr)), "x", area="mask_only", steps=2, model=TINY_INPAINT)
    assert (result.image.width, result.image.height) == (width, height)


# ---- strength arrives as float32 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.35, 0.7, 0.95])
def test_float32_strength_runs_the_steps_diffusers_runs(client: Client, models_dir: Path, strength: float) -> None:
    image = sample_image()
    done: list[int] = []
    result = client.edit(png(image), "a green square", strength=strength, steps=20, seed=4, guidance_scale=7.5,
                         scheduler="DDIM", on_progress=lambda p: done.append(p.step))  # fmt: skip
    assert len(done) == int(20 * strength)
    expected = direct(models_dir, TINY, "edit", "DDIM", prompt="a green square", image=image, strength=strength,
                      num_inference_steps=20, guidance_scale=7.5, seed=4)  # fmt: skip
    assert_same([pixels(result.image.data)], expected)
    assert result.parameters["strength"] == strength


def test_tiny_strength_times_many_steps_runs_one_step(client: Client) -> None:
    done: list[int] = []
    client.edit(png(sample_image()), "x", strength=0.01, steps=100, seed=1, on_progress=lambda p: done.append(p.step))
    assert done == [1]


# ---- bytes that do not decode ------------------------------------------------------------------------------------


def _raw_call(target: str, method: str, payload: bytes, stream: bool) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        if stream:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                list(call(payload, timeout=30))
        else:
            unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                unary(payload, timeout=30)
    return info.value


def _violations(err: grpc.RpcError) -> dict[str, str]:
    trailers: Any = err.trailing_metadata()
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return {v.field: v.description for v in bad.field_violations}
    return {}


def _with_bad_utf8(message: Any, field_path: list[int], marker: str) -> bytes:
    """Serializes `message`, then swaps the bytes of the string `marker` for invalid UTF-8 of the same length."""
    data: bytes = message.SerializeToString()
    raw = marker.encode()
    assert data.count(raw) == 1
    return data.replace(raw, b"\xff\xfe" + raw[2:])


@pytest.mark.parametrize(
    ("method", "build", "field"),
    [
        ("Generate", lambda: pb.GenerateRequest(params=pb.GenerationParams(prompt="MARKER-prompt")), "params.prompt"),
        (
            "Edit",
            lambda: pb.EditRequest(params=pb.GenerationParams(negative_prompt="MARKER-neg")),
            "params.negative_prompt",
        ),
        ("Inpaint", lambda: pb.InpaintRequest(params=pb.GenerationParams(model="MARKER-model")), "params.model"),
    ],
)
def test_invalid_utf8_is_invalid_argument_naming_the_field(server: ServerThread, method: str, build: Any,
                                                            field: str) -> None:  # fmt: skip
    message = build()
    marker = next(v for v in (message.params.prompt, message.params.negative_prompt, message.params.model) if v)
    err = _raw_call(server.target, f"/sdserve.v1.DiffusionService/{method}", _with_bad_utf8(message, [], marker), True)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert _violations(err) == {field: "must be valid UTF-8 text"}
    assert "class" not in (err.details() or "")
    with Client(server.target) as c:
        c.generate("still serving", steps=1, seed=1)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0b\x01"])
def test_garbage_bytes_are_invalid_argument_never_unknown(server: ServerThread, payload: bytes) -> None:
    for method, stream in (("Generate", True), ("ListModels", False), ("GetServerInfo", False)):
        err = _raw_call(server.target, f"/sdserve.v1.DiffusionService/{method}", payload, stream)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err)
        assert "request" in _violations(err)
        assert "DecodeError" not in (err.details() or "")


def test_sidecar_edge_refuses_undecodable_bytes(tmp_path: Path) -> None:
    from tests.model_manager.harness import Sidecar

    car = Sidecar(tmp_path / "store").start()
    try:
        data = _with_bad_utf8(mm.SetAliasRequest(alias="MARKER-alias", model="m"), [], "MARKER-alias")
        err = _raw_call(car.target, "/sdserve.v1.ModelManagerService/SetAlias", data, False)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert _violations(err) == {"alias": "must be valid UTF-8 text"}
        err = _raw_call(car.target, "/sdserve.v1.ModelManagerService/WatchModels", b"\xff\xff", True)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    finally:
        car.stop()


# ---- outcome labels and log lines --------------------------------------------------------------------------------


def _waitrequests_counted(srv: ServerThread, value: float, **labels: str) -> float:
    """The request counter is bumped when the handler finishes, just after the client sees the status."""
    deadline = time.monotonic() + 30
    while requests_counted(srv, **labels) < value and time.monotonic() < deadline:
        time.sleep(0.01)
    return requests_counted(srv, **labels)


def test_deadlines_are_counted_as_deadlines(server: ServerThread) -> None:
    before = requests_counted(server, outcome="deadline", rpc="Generate")
    cancelled = requests_counted(server, outcome="cancelled", rpc="Generate")
    with Client(server.target) as c:
        for _ in range(4):
            with pytest.raises(SdserveError) as info:
                c.generate("slow", steps=150, width=256, height=256, timeout=0.3)
            assert info.value.code == "DEADLINE_EXCEEDED"
    assert _waitrequests_counted(server, before + 4, outcome="deadline", rpc="Generate") == before + 4
    assert requests_counted(server, outcome="cancelled", rpc="Generate") == cancelled


def test_refused_requests_carry_their_model_and_request_id(server: ServerThread, caplog: pytest.LogCaptureFixture
                                                          ) -> None:  # fmt: skip
    before = requests_counted(server, outcome="invalid", model=TINY)
    unknown = requests_counted(server, outcome="not_found", model="unknown")
    with caplog.at_level(logging.INFO, logger="service.servicer"), Client(server.target) as c:
        expect(lambda: c.generate("x", model=TINY, width=100, request_id="rid-invalid-1"), "INVALID_ARGUMENT",
               "params.width")  # fmt: skip
        expect(lambda: c.generate("x", model="no-such-model", request_id="rid-nf-1"), "NOT_FOUND", "")
        assert _waitrequests_counted(server, before + 1, outcome="invalid", model=TINY) == before + 1
        assert _waitrequests_counted(server, unknown + 1, outcome="not_found", model="unknown") == unknown + 1
    ids = {getattr(r, "request_id", "") for r in caplog.records if r.getMessage() == "request"}
    assert {"rid-invalid-1", "rid-nf-1"} <= ids
