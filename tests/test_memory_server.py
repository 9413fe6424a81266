"""The memory strategies through the server: chosen per batch from the settings and the request size, named in
Started, the result and a metric label, listed in GetServerInfo; model CPU offload keeps images identical (its
hooks run here with the CPU as the execution device: there is no second device on this machine)."""

from __future__ import annotations

import io
from pathlib import Path

import diffusers
import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from sdserve_core.components import load_components
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import offload, run
from sdserve_core.tasks import Task
from service.settings import Settings
from service.tiny_sdxl import build_tiny_sdxl
from tests.harness import serving
from tests.test_ops import sample, scrape


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("memory-models")
    build_tiny_sdxl(root / "xl", seed=0)
    return root


def generate(target: str, **params: object) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        p = pb.GenerationParams(prompt="a hill", steps=2, seed=5, **params)  # type: ignore[arg-type]
        return list(stub.Generate(pb.GenerateRequest(params=p)))


def pixels(event: pb.GenerateResponse) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.result.images[0].data)).convert("RGB"), dtype=np.int16)


def test_strategies_are_chosen_named_and_counted(xl_dir: Path) -> None:
    """With vae_tiling_min_pixels at 96x96, a 128x128 request tiles and a 64x64 one does not; a batch that tiles
    also slices. The strategy is in Started, the result and sdserve_memory_strategy_calls; GetServerInfo shows the
    policy."""
    with serving(xl_dir, default_model="xl", vae_tiling_min_pixels=96 * 96, metrics_port=0) as srv:
        small = generate(srv.target, width=64, height=64)
        big = generate(srv.target, width=128, height=128, num_images=2)
        assert small[1].started.memory_strategy == "none"
        assert small[-1].result.parameters.memory_strategy == "none"
        assert big[1].started.memory_strategy == "vae_slicing,vae_tiling"
        assert big[-1].result.parameters.memory_strategy == "vae_slicing,vae_tiling"
        assert srv.server is not None
        # The worker counts a call after posting its results: work queued now runs once that call is done.
        srv.server.worker.run(lambda: None)
        text = scrape(srv.server.metrics_port)
        assert sample(text, "sdserve_memory_strategy_calls_total", model="xl", strategy="vae_slicing,vae_tiling") == 1
        assert sample(text, "sdserve_memory_strategy_calls_total", model="xl", strategy="none") >= 1
        with grpc.insecure_channel(srv.target) as channel:
            info = pb_grpc.DiffusionServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
    memory = info.memory
    assert (memory.vae_tiling, memory.vae_slicing, memory.attention_slicing, memory.cpu_offload) == ("auto",) * 4
    assert memory.vae_tiling_min_pixels == 96 * 96
    assert memory.device_free_bytes == 0 and not memory.offloaded_models  # CPU: not measured, never offloaded
    assert {f.name for f in info.families} == {"sd15", "sdxl"}


def test_forced_settings_win_and_tiling_keeps_the_image(xl_dir: Path) -> None:
    """vae_tiling on tiles even a small request, off never does; at 128x128 the tiled decode (tiles of the VAE's
    own sample size, blended) stays close to the whole-image one."""
    with serving(xl_dir, default_model="xl", vae_tiling="on", vae_slicing="off") as srv:
        tiled = generate(srv.target, width=128, height=128)
    with serving(xl_dir, default_model="xl", vae_tiling="off", cpu_offload="on") as srv:
        whole = generate(srv.target, width=128, height=128)
        assert srv.server is not None
        assert srv.server.registry.offloaded() == []  # "on" never offloads on a CPU device
    assert tiled[1].started.memory_strategy == "vae_tiling"
    assert whole[1].started.memory_strategy == "none"
    diff = np.abs(pixels(tiled[-1]) - pixels(whole[-1]))
    # Measured here: mean 2.1/255, max 58/255 along the blended tile seams of the random-weight VAE.
    assert diff.mean() < 8


@pytest.mark.parametrize("name", ["vae_tiling", "vae_slicing", "attention_slicing", "cpu_offload"])
def test_bad_modes_are_refused_at_start(xl_dir: Path, name: str) -> None:
    with pytest.raises(SystemExit, match=f"{name} must be auto, on or off"):
        Settings(model_dirs=(xl_dir,), **{name: "sometimes"}).check()  # type: ignore[arg-type]


def test_offloaded_components_make_the_same_image(xl_dir: Path) -> None:
    """Model CPU offload attaches accelerate hooks to the shared modules; pipelines built over them afterwards (one
    per call, as the server builds them) run as before."""
    folder = xl_dir / "xl"
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    call = PipelineCall(Task.GENERATE, 2, 64, 64, torch.Generator().manual_seed(3), output_type="np", prompt="a hill")
    plain = run(load_components(folder, "fp32", torch.float32, "cpu"), call, scheduler)
    hooked = load_components(folder, "fp32", torch.float32, "cpu")
    offload(hooked, "cpu")
    assert hasattr(hooked.unet, "_hf_hook")
    call = PipelineCall(Task.GENERATE, 2, 64, 64, torch.Generator().manual_seed(3), output_type="np", prompt="a hill")
    # Equal to float32 rounding (the hooks re-enter the modules through accelerate: measured max 2e-7).
    assert np.abs(run(hooked, call, scheduler) - plain).max() < 1e-5
