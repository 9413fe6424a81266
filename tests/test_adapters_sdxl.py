"""Adapters on SDXL through a real server: a LoRA on the UNet and both text encoders and an SDXL embedding
(clip_l + clip_g vectors), against direct diffusers calls. Tolerance: every pixel within 1/255."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import grpc
import numpy as np
import pytest
import torch

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service.tiny import build_tiny
from service.tiny_sdxl import build_tiny_sdxl
from tests import adapter_models as am
from tests.harness import pixels, running

XL, SD = "xl", "sd"
STEPS = 3
TOLERANCE = 1


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    models = tmp_path_factory.mktemp("xl-models")
    build_tiny_sdxl(models / XL, seed=0, kind="base")
    build_tiny(models / SD)
    adapters = tmp_path_factory.mktemp("xl-adapters")
    am.make_lora(models / XL, adapters / "xl-lora", text_2=True, seed=4)
    am.make_lora(models / SD, adapters / "sd-lora", seed=5)
    g = torch.Generator().manual_seed(6)
    width = 32
    am.publish(
        adapters / "xl-tok",
        {"clip_l": torch.randn(2, width, generator=g), "clip_g": torch.randn(2, width, generator=g)},
        "<xtok>",
    )
    return models, adapters


@pytest.fixture(scope="module")
def stub(dirs: tuple[Path, Path]) -> Iterator[pb_grpc.DiffusionServiceStub]:
    models, adapters = dirs
    for srv in running(models, default_model=XL, adapter_dirs=(adapters,), prompt_cache_bytes=0):
        with grpc.insecure_channel(srv.target) as channel:
            yield pb_grpc.DiffusionServiceStub(channel)


def generate(stub: pb_grpc.DiffusionServiceStub, prompt: str, loras: tuple[tuple[str, float], ...] = ()) -> Any:
    p = pb.GenerationParams(prompt=prompt, steps=STEPS, seed=3, model=XL)
    for name, scale in loras:
        p.adapters.add(name=name, scale=scale)
    started = None
    for event in stub.Generate(pb.GenerateRequest(params=p)):
        if event.HasField("started"):
            started = event.started
        if event.HasField("result"):
            return started, pixels(event.result.images[0].data)
    raise AssertionError("no result")


_PIPE: dict[str, Any] = {}


def direct(models: Path, prompt: str, setup: Any = None) -> np.ndarray:
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(models / XL, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if setup is not None:
        setup(pipe)
    out = pipe(prompt, num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    return np.asarray(out.convert("RGB"), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= TOLERANCE


def test_an_sdxl_lora_matches_diffusers_and_leaves_no_trace(
    stub: pb_grpc.DiffusionServiceStub, dirs: tuple[Path, Path]
) -> None:
    models, adapters = dirs
    _, plain = generate(stub, "a red circle")
    started, served = generate(stub, "a red circle", (("xl-lora", 0.8),))
    assert [(a.name, a.scale) for a in started.adapters] == [("xl-lora", pytest.approx(0.8))]
    assert not close(served, plain)

    def lora(pipe: Any) -> None:
        pipe.load_lora_weights(str(adapters / "xl-lora"), weight_name="adapter.safetensors", adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[0.8])

    assert close(served, direct(models, "a red circle", lora))
    assert np.array_equal(generate(stub, "a red circle")[1], plain)


def test_an_sdxl_embedding_matches_diffusers(stub: pb_grpc.DiffusionServiceStub, dirs: tuple[Path, Path]) -> None:
    models, adapters = dirs
    started, served = generate(stub, "a <xtok> circle")
    assert [a.token for a in started.adapters] == ["<xtok>"]
    state = am.load_state(adapters / "xl-tok")

    def embedding(pipe: Any) -> None:
        pipe.load_textual_inversion(
            state["clip_l"], token="<xtok>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token="<xtok>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )

    assert close(served, direct(models, "a <xtok> circle", embedding))


def test_an_sd_lora_is_refused_on_sdxl(stub: pb_grpc.DiffusionServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, "a red circle", (("sd-lora", 1.0),))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "params.adapters[0].name" in details and "sd15" in details and "sdxl" in details
