"""Shared fixtures: tiny models built once per session and a real server on port 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import Client
from tests.harness import ServerThread, build_models, running

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Servers the tests start as processes run the exact profile, as the in-process ones do (tests/harness.py): their
# images are compared with direct diffusers calls, and measuring profiles at each start would add to the suite's
# time. tests/test_profiles.py covers the other profiles.
os.environ.setdefault("SDSERVE_EXECUTION_PROFILE", "exact")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the two-core reference machine: one torch thread each (and in the
    # servers they start), so the workers share the cores instead of spin-waiting on each other's.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir)


@pytest.fixture()
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c
