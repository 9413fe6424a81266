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
from tests.clients.live import LiveServer, start_server, stop_server

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


def _run(stub: pb_grpc.DiffusionServiceStub, rpc: str, request: Any) -> list[bytes]:
    """Runs one stream with the Python stubs and returns its result images' bytes."""
    events = list(getattr(stub, rpc.capitalize())(request, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "result", kinds
    return [image.data for image in events[-1].result.images]


@pytest.fixture(scope="package")
def reference_cases(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs each case through the Python stubs and writes requests (proto3 JSON) and image bytes to a file."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    cases: dict[str, dict[str, Any]] = {}
    with grpc.insecure_channel(live_server.address, options=options) as channel:
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
            cases[name] = {
                "rpc": name,
                "request": json_format.MessageToDict(request),
                "images": [
                    {"sha256": hashlib.sha256(data).hexdigest(), "data_b64": base64.b64encode(data).decode("ascii")}
                    for data in images
                ],
            }
    path = tmp_path_factory.mktemp("reference") / "cases.json"
    path.write_text(json.dumps({"server": live_server.address, "cases": cases}, indent=1))
    return path
