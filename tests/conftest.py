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
