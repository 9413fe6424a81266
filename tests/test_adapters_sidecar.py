"""Adapters stored by the model-manager sidecar are served: the server follows the sidecar's store (its adapters
folder from the WatchModels snapshot), finds an adapter imported while it serves, and stops finding it once the
sidecar deletes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from tests import adapter_models as am
from tests.harness import TINY, serving
from tests.model_manager.harness import Sidecar


@pytest.fixture()
def sources(tmp_path: Path, models_dir: Path) -> Path:
    root = tmp_path / "sources"
    am.make_lora(models_dir / TINY, root / "style", seed=9)
    return root


@pytest.fixture()
def sidecar(tmp_path: Path, sources: Path) -> Iterator[Sidecar]:
    car = Sidecar(tmp_path / "store", import_roots=[sources]).start()
    try:
        yield car
    finally:
        car.stop()


def generate(stub: pb_grpc.DiffusionServiceStub, *loras: str) -> pb.ResultEvent:
    p = pb.GenerationParams(model=TINY, prompt="a red circle", steps=2, seed=1)
    for name in loras:
        p.adapters.add(name=name, scale=1.0)
    return list(stub.Generate(pb.GenerateRequest(params=p)))[-1].result


def test_an_adapter_the_sidecar_stores_is_served(sidecar: Sidecar, sources: Path, models_dir: Path) -> None:
    target = sidecar.target
    with serving(models_dir, manager_target=target, adapter_dirs=()) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, "styled")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with sidecar.client() as mc:
            stored = mc.import_adapter(str(sources / "style" / "adapter.safetensors"), name="styled")
        result = generate(stub, "styled")
        (used,) = result.parameters.adapters
        assert used.name == "styled" and used.sha256 == stored.adapter.sha256
        assert result.images[0].data != generate(stub).images[0].data
        with sidecar.client() as mc:
            mc.delete_adapter("styled")
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, "styled")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
