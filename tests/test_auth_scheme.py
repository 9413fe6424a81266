"""The Bearer scheme is case-insensitive (RFC 7235) and whitespace around the key is tolerated, on both servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from sdserve.v1 import model_manager_pb2 as mm
from sdserve.v1 import model_manager_pb2_grpc as mm_grpc
from tests.harness import ServerThread, running
from tests.model_manager.harness import Sidecar

KEY = "s3cret-key"
# gRPC refuses tabs in metadata values on the client side, so only spaces can reach the server.
ACCEPTED = [
    f"Bearer {KEY}",
    f"bearer {KEY}",
    f"BEARER {KEY}",
    f"bEaReR {KEY}",
    f"Bearer   {KEY}",
    f"  Bearer {KEY}  ",
]
REFUSED = [
    KEY,
    f"Basic {KEY}",
    f"Bearer{KEY}",
    f"bearer{KEY}",
    "Bearer ",
    "bearer",
    f"Bearer {KEY}x",
    f"Bearer {KEY} extra",
    f"Token {KEY}",
]


@pytest.fixture(scope="module")
def keyed(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, api_keys=(KEY,), preload_default=False)


def code(call: object) -> grpc.StatusCode:
    assert callable(call)
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("value", ACCEPTED)
def test_server_accepts_any_case_and_spacing(keyed: ServerThread, value: str) -> None:
    with grpc.insecure_channel(keyed.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        md = (("authorization", value),)
        assert code(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30)) == grpc.StatusCode.OK
        # Streaming RPCs pass the same check; an invalid width shows the call got past it to validation.
        bad = pb.GenerateRequest(params=pb.GenerationParams(width=12))
        assert code(lambda: list(stub.Generate(bad, metadata=md, timeout=30))) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("value", REFUSED)
def test_server_refuses_other_schemes_and_keys(keyed: ServerThread, value: str) -> None:
    with grpc.insecure_channel(keyed.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        md = (("authorization", value),)
        assert code(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        bad = pb.GenerateRequest(params=pb.GenerationParams(width=12))
        assert code(lambda: list(stub.Generate(bad, metadata=md, timeout=30))) == grpc.StatusCode.UNAUTHENTICATED


def test_sidecar_accepts_a_lowercase_scheme(tmp_path: Path) -> None:
    car = Sidecar(tmp_path / "store", args=["--api-keys", KEY]).start()
    try:
        with grpc.insecure_channel(car.target) as ch:
            stub = mm_grpc.ModelManagerServiceStub(ch)

            def listing(value: str) -> grpc.StatusCode:
                md = (("authorization", value),)
                return code(lambda: stub.ListStoredModels(mm.ListStoredModelsRequest(), metadata=md, timeout=30))

            assert listing(f"bearer  {KEY}") == grpc.StatusCode.OK
            assert listing(f"BEARER {KEY}") == grpc.StatusCode.OK
            assert listing(f"Basic {KEY}") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        car.stop()
