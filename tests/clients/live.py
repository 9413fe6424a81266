"""Helpers for the client tests: a sdserve subprocess waited on through its health service, tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.tiny_sdxl import build_tiny_sdxl
from training.shapes.adapters import LORA_NAME
from training.shapes.grammar import LORA_COLOURS

REPO = Path(__file__).resolve().parents[2]
SERVICE_NAME = "sdserve.v1.DiffusionService"
START_TIMEOUT_S = 300.0  # first start builds the tiny model and warms it; CI machines can be slow
HEALTH_POLL_S = 0.2
INSTALL_HINT = "install the client toolchains with scripts/install_client_toolchains.sh"
# Tiny SDXL models the live server also serves (never its default), for the clients' SDXL tests.
SDXL_BASE = "tiny-sdxl"
SDXL_REFINER = "tiny-sdxl-refiner"
# The shapes LoRA the repository ships (when it does): the clients' adapter tests apply it to `shapes`.
SHAPES_LORA = REPO / "models" / "adapters" / LORA_NAME
# A prompt that uses its first new colour word.
LORA_PROMPT = f"a {next(iter(LORA_COLOURS))} circle on a white background"
# An adapter no server has, and the field a NOT_FOUND for it names.
MISSING_ADAPTER = "no-such-adapter"
ADAPTER_FIELD = "params.adapters[0].name"


@dataclass(frozen=True)
class LiveServer:
    """A `python -m service` subprocess that reported SERVING."""

    address: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"sdserve exited with {self.process.returncode}:\n{self.log_tail()}"


def _read_port(port_file: Path) -> int | None:
    try:
        return int(port_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _wait_serving(process: subprocess.Popen[bytes], port_file: Path, log_path: Path) -> str:
    """Polls (bounded) for the port file, then for health SERVING; fails early if the server dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    address = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"sdserve exited with {process.returncode} before serving:\n{log}")
        if not address:
            port = _read_port(port_file)
            address = f"127.0.0.1:{port}" if port else ""
        if address and _serving(address):
            return address
        time.sleep(HEALTH_POLL_S)
    log = log_path.read_text(errors="replace")[-4000:]
    pytest.fail(f"sdserve did not report SERVING within {START_TIMEOUT_S:.0f} s:\n{log}")


def start_server(tmp: Path) -> LiveServer:
    """Starts `python -m service` on port 0 with a model folder under `tmp` (holding tiny SDXL base and refiner
    models); returns once it reports SERVING."""
    own_models = tmp / "models"
    own_models.mkdir()
    build_tiny_sdxl(own_models / SDXL_BASE, seed=0, kind="base")
    build_tiny_sdxl(own_models / SDXL_REFINER, seed=5, kind="refiner")
    port_file = tmp / "port"
    log_path = tmp / "server.log"
    # The temporary folder comes first: with no model anywhere the server builds tiny-sd into the first
    # folder, which must not be the repository. When models/ holds the embedded `shapes`, that one serves.
    model_dirs = f"{own_models}{os.pathsep}{REPO / 'models'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDSERVE_")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "service", "--port", "0", "--port-file", str(port_file)]
    cmd += ["--model-dirs", model_dirs, "--log-format", "text", "--metrics-port", "-1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        address = _wait_serving(process, port_file, log_path)
    except BaseException:
        stop_server(process)
        raise
    return LiveServer(address, log_path, process)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def require_tool(name: str) -> str:
    """The tool's path; fails (never skips) when it is missing, since CI must install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: {INSTALL_HINT}")
    return path


def run_checked(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Runs `cmd`; fails the test with its output when it exits non-zero. Returns stdout+stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode} in {cwd}:\n{output[-8000:]}")
    return output
