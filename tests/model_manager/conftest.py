"""Fixtures for the model-manager tests: tiny models, a local hub on 127.0.0.1, and sidecar processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.tiny import build_tiny
from tests.model_manager.harness import BIG_REPO, TINY_REPO, Sidecar, build_big, hub_files
from tests.model_manager.hubserver import HubServer


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An import folder holding tiny-sd (seed 0), tiny-sd-old (seed 1) and tiny-inpaint (9 channels)."""
    root = tmp_path_factory.mktemp("imports")
    build_tiny(root / "tiny-sd", seed=0)
    build_tiny(root / "tiny-sd-old", seed=1)
    build_tiny(root / "tiny-inpaint", seed=10, in_channels=9)
    return root


@pytest.fixture(scope="session")
def tiny_sd(tiny_root: Path) -> Path:
    return tiny_root / "tiny-sd"


@pytest.fixture(scope="session")
def repo_files(tiny_root: Path) -> dict[str, dict[str, bytes]]:
    """Files of two commits of the test repository, 'old' (seed 1, fp32 only) and 'main' (seed 0, fp32 and fp16),
    and of a repository whose UNet file is larger than one huggingface_hub download chunk ('big')."""
    return {
        "old": hub_files(tiny_root / "tiny-sd-old", with_fp16=False),
        "main": hub_files(tiny_root / "tiny-sd"),
        "big": hub_files(build_big(tiny_root / "tiny-sd", tiny_root.parent / "big" / "tiny-sd-big"), with_fp16=False),
    }


@pytest.fixture()
def hub(repo_files: dict[str, dict[str, bytes]]) -> Iterator[HubServer]:
    """A fresh local hub serving TINY_REPO (commits: old, then main) and a repository with pickled weights only."""
    server = HubServer()
    repo = server.repo(TINY_REPO)
    repo.add_commit(repo_files["old"], ref="v0.1")
    repo.add_commit(repo_files["main"], ref="main")
    pickled = {k: v for k, v in repo_files["main"].items() if not k.endswith(".safetensors")}
    server.repo("sdserve-test/pickled").add_commit(pickled)
    server.repo(BIG_REPO).add_commit(repo_files["big"])
    yield server
    server.stop()


@pytest.fixture()
def sidecars() -> Iterator[Callable[..., Sidecar]]:
    """Starts sidecars (each in its own process) and stops whatever is left at the end of the test."""
    started: list[Sidecar] = []

    def start(store: Path, **kwargs: Any) -> Sidecar:
        sidecar = Sidecar(store, **kwargs)
        started.append(sidecar)
        return sidecar.start()

    yield start
    for sidecar in started:
        # Printed for a failing test only (pytest shows a failed test's captured output): whether the sidecar had
        # exited on its own before the end of the test, and its last log lines.
        died = sidecar.proc is not None and sidecar.proc.poll() is not None
        code = sidecar.stop()
        state = f"exited with {code} before the test ended" if died else f"stopped at the end of the test ({code})"
        print(f"--- sidecar {sidecar.target} ({sidecar.store}): {state}; its last log lines:")
        print("".join(sidecar.lines[-40:]))


@pytest.fixture()
def sidecar(tmp_path: Path, hub: HubServer, tiny_root: Path, sidecars: Callable[..., Sidecar]) -> Sidecar:
    """One sidecar on a fresh store, pulling from the local hub and importing from the tiny models' folder."""
    return sidecars(tmp_path / "store", hub_url=hub.url, import_roots=[tiny_root])
