"""A hot swap across families under load: an alias moves from an SD 1.x model to an SDXL model (and back) through
the model-manager sidecar while clients keep generating on it; no request fails, and every result comes from one
model or the other, whole."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service.tiny import build_tiny
from service.tiny_sdxl import build_tiny_sdxl
from tests import test_hotswap
from tests.harness import serving
from tests.model_manager.harness import Sidecar
from tests.test_hotswap import SwapWatch, imported


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family-swap")
    build_tiny(root / "one", seed=0)
    build_tiny_sdxl(root / "xl", seed=0)
    return root


# test_hotswap's sidecar fixture, importing from this module's sources.
sidecar = test_hotswap.sidecar


def served(stub: pb_grpc.DiffusionServiceStub) -> tuple[str, str]:
    """(revision, family-dependent resolved field) of one small request on the alias."""
    p = pb.GenerationParams(model="prod", prompt="x", steps=2, seed=1)
    result = list(stub.Generate(pb.GenerateRequest(params=p)))[-1].result
    return result.parameters.model_revision, result.parameters.scheduler_class


def test_swap_from_sd15_to_sdxl_under_load_fails_nothing(sidecar: Sidecar, sources: Path, models_dir: Path) -> None:
    rev_one, rev_xl = imported(sidecar, sources, "one"), imported(sidecar, sources, "xl")
    with sidecar.client() as mc:
        mc.set_alias("prod", "one")
    with serving(models_dir, manager_target=sidecar.target, default_model="prod") as srv:
        swaps = SwapWatch(srv)
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            assert served(stub)[0] == rev_one
            stop = threading.Event()
            seen: list[tuple[str, str]] = []
            failures: list[BaseException] = []
            progress = threading.Condition()

            def load() -> None:
                while not stop.is_set():
                    try:
                        got = served(stub)
                    except BaseException as exc:
                        with progress:
                            failures.append(exc)
                            progress.notify_all()
                        return
                    with progress:
                        seen.append(got)
                        progress.notify_all()

            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            with sidecar.client() as mc:
                mc.set_alias("prod", "xl")
                assert swaps.wait(1) == [True]
                with progress:
                    mark = len(seen)
                    assert progress.wait_for(lambda: len(seen) >= mark + 3 or bool(failures), 120)
                mc.set_alias("prod", "one")
                assert swaps.wait(2) == [True, True]
            with progress:
                mark = len(seen)
                assert progress.wait_for(lambda: len(seen) >= mark + 3 or bool(failures), 120)
            stop.set()
            for t in threads:
                t.join(60)
            assert not failures, failures
            # Each result is wholly one model's: SD 1.x results run its DDIM config, SDXL's its Euler config.
            assert set(seen) <= {(rev_one, "DDIMScheduler"), (rev_xl, "EulerDiscreteScheduler")}
            assert (rev_xl, "EulerDiscreteScheduler") in seen
            assert served(stub)[0] == rev_one
            models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert {m.family for m in models.values()} >= {"sd15", "sdxl"}
