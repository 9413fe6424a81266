"""Fixtures for the TypeScript and Go client tests: one real sdserve subprocess and reference images."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from PIL import Image, ImageDraw

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from tests.clients.live import (
    ADAPTER_FIELD,
    LORA_PROMPT,
    MISSING_ADAPTER,
    SDXL_BASE,
    SDXL_REFINER,
    SHAPES_LORA,
    LiveServer,
    start_server,
    stop_server,
)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="package")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One sdserve for this folder's tests, on port 0 with a temporary model folder; stopped at the end."""
    server = start_server(tmp_path_factory.mktemp("sdserve-clients"))
    try:
        yield server
    finally:
        stop_server(server.process)


def _mask_png(size: int) -> bytes:
    """A mask whose white (repaint) part is a box in the lower right quarter."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 2, size // 2, size - 8, size - 8), fill=255)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


def _events(stub: pb_grpc.DiffusionServiceStub, rpc: str, request: Any) -> list[Any]:
    """Runs one stream with the Python stubs and returns its messages, checking their order."""
    events = list(getattr(stub, rpc.capitalize())(request, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "result", kinds
    return events


def _run(stub: pb_grpc.DiffusionServiceStub, rpc: str, request: Any) -> list[bytes]:
    """Runs one stream with the Python stubs and returns its result images' bytes."""
    return [image.data for image in _events(stub, rpc, request)[-1].result.images]


def _channel(address: str) -> grpc.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.insecure_channel(address, options=options)


def _expected(images: list[bytes]) -> list[dict[str, str]]:
    return [
        {"sha256": hashlib.sha256(data).hexdigest(), "data_b64": base64.b64encode(data).decode("ascii")}
        for data in images
    ]


@pytest.fixture(scope="package")
def reference_cases(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs each case through the Python stubs and writes requests (proto3 JSON) and image bytes to a file."""
    cases: dict[str, dict[str, Any]] = {}
    with _channel(live_server.address) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        generate = pb.GenerateRequest(
            params=pb.GenerationParams(
                prompt="a red circle on a white background", width=64, height=64, steps=3, seed=1234, num_images=2
            )
        )
        first = _run(stub, "generate", generate)
        assert _run(stub, "generate", generate) == first, "the server is not deterministic for a fixed seed"
        source = first[0]
        edit = pb.EditRequest(
            params=pb.GenerationParams(prompt="a blue square", steps=4, seed=77, guidance_scale=5.0),
            image=source,
            strength=0.5,
        )
        inpaint = pb.InpaintRequest(
            params=pb.GenerationParams(prompt="a green triangle", steps=3, seed=99, scheduler=pb.SCHEDULER_EULER),
            image=source,
            mask=_mask_png(64),
            mask_blur=2,
            preserve_unmasked=True,
        )
        for name, request in (("generate", generate), ("edit", edit), ("inpaint", inpaint)):
            images = first if name == "generate" else _run(stub, name, request)
            cases[name] = {"rpc": name, "request": json_format.MessageToDict(request), "images": _expected(images)}
    path = tmp_path_factory.mktemp("reference") / "cases.json"
    path.write_text(json.dumps({"server": live_server.address, "cases": cases}, indent=1))
    return path


# The clients' SDXL tests write this request in their own idiom and check it equals this one.
SDXL_REQUEST = pb.GenerateRequest(
    params=pb.GenerationParams(
        model=SDXL_BASE,
        prompt="a lighthouse",
        prompt_2="oil painting",
        negative_prompt="blurry",
        negative_prompt_2="low contrast",
        width=64,
        height=64,
        steps=4,
        seed=2024,
        conditioning=pb.MicroConditioning(
            original_size=pb.ImageSize(width=128, height=96),
            crops_coords_top_left=pb.CropOffset(top=8, left=16),
            target_size=pb.ImageSize(width=64, height=64),
            aesthetic_score=7.0,
        ),
        refiner=pb.RefinerOptions(model=SDXL_REFINER, mode=pb.REFINER_MODE_LATENT_HANDOFF, switch_at=0.5),
    )
)
_PASS_NAMES = {pb.DENOISE_PASS_BASE: "base", pb.DENOISE_PASS_REFINER: "refiner"}


@pytest.fixture(scope="package")
def sdxl_cases(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs SDXL_REQUEST (prompt_2, micro-conditioning, a refiner pass) through the Python stubs twice and writes
    the models' names, the request (proto3 JSON), the image bytes and each progress event's pass to a file."""
    with _channel(live_server.address) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        events = _events(stub, "generate", SDXL_REQUEST)
        again = _events(stub, "generate", SDXL_REQUEST)
    images = [image.data for image in events[-1].result.images]
    assert images == [image.data for image in again[-1].result.images], "the server is not deterministic for SDXL"
    passes = [_PASS_NAMES.get(e.progress.denoise_pass, "") for e in events if e.WhichOneof("event") == "progress"]
    assert "base" in passes and "refiner" in passes, passes
    case = {
        "base": SDXL_BASE,
        "refiner": SDXL_REFINER,
        "request": json_format.MessageToDict(SDXL_REQUEST),
        "images": _expected(images),
        "passes": passes,
    }
    path = tmp_path_factory.mktemp("reference-sdxl") / "sdxl.json"
    path.write_text(json.dumps(case, indent=1))
    return path


def adapter_request(lora: str) -> pb.GenerateRequest:
    """The clients' adapter tests write this request in their own idiom and check it equals this one."""
    return pb.GenerateRequest(
        params=pb.GenerationParams(
            model="shapes",
            prompt=LORA_PROMPT,
            steps=8,
            seed=5,
            adapters=[pb.AdapterRef(name=lora, scale=1.0)],
        )
    )


@pytest.fixture(scope="package")
def adapter_cases(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unknown adapter's name and the field the server names for it; when the checkout ships the shapes LoRA
    (models/adapters/LORA_NAME), also a request with it run through the Python stubs: the request (proto3
    JSON), the image bytes and the resolved adapters (proto3 JSON) the server reported in `started` and the result.
    Without the LoRA `lora` is "" and the clients skip that test."""
    case: dict[str, Any] = {"missing": MISSING_ADAPTER, "field": ADAPTER_FIELD, "lora": ""}
    if SHAPES_LORA.is_dir():
        request = adapter_request(SHAPES_LORA.name)
        with _channel(live_server.address) as channel:
            events = _events(pb_grpc.DiffusionServiceStub(channel), "generate", request)
        started, result = events[1].started, events[-1].result
        resolved = [json_format.MessageToDict(a) for a in result.parameters.adapters]
        assert resolved == [json_format.MessageToDict(a) for a in started.adapters], (started, result)
        assert [a["name"] for a in resolved] == [SHAPES_LORA.name], resolved
        case.update(
            lora=SHAPES_LORA.name,
            prompt=LORA_PROMPT,
            request=json_format.MessageToDict(request),
            images=_expected([image.data for image in result.images]),
            adapters=resolved,
        )
    path = tmp_path_factory.mktemp("reference-adapters") / "adapters.json"
    path.write_text(json.dumps(case, indent=1))
    return path
