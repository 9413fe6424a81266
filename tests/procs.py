"""Runs `python -m service` as a real subprocess on port 0 and waits for readiness (bounded polling)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ServiceProcess:
    """A server subprocess; `target` once ready; `stderr_lines()` after it exits."""

    def __init__(self, models_dir: Path, workdir: Path, *flags: str, wrapper: tuple[str, ...] = ()):
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ, SDSERVE_LOG_FORMAT="json", SDSERVE_METRICS_PORT="-1")
        self.proc = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "service",
                "--port",
                "0",
                "--port-file",
                str(self.port_file),
                "--model-dirs",
                str(models_dir),
                "--default-model",
                "tiny-sd",
                *flags,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.target = ""

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not (self.port_file.exists() and self.port_file.read_text()):
            self._check_alive(deadline)
        self.target = f"127.0.0.1:{self.port_file.read_text()}"
        while self.health() != "SERVING":
            self._check_alive(deadline)
        return self.target

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("server did not become ready")
        time.sleep(0.05)

    def health(self, service: str = "") -> str:
        with grpc.insecure_channel(self.target) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            except grpc.RpcError as err:
                return str(err.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def log_lines(self) -> list[str]:
        self._log.flush()
        return self.log_path.read_text().splitlines()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port another socket is listening on, for as long as the block runs."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])
