"""Starts `python -m service` on port 0 for an evaluation run and stops it afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@contextlib.contextmanager
def running_server(*flags: str, timeout: float = 300.0) -> Iterator[str]:
    """Yields the target of a fresh server on the default model dirs; bounded wait for SERVING."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        log = (Path(tmp) / "server.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--metrics-port",
                "-1",
                "--log-format",
                "text",
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            target = ""
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready")
                if not target and port_file.exists() and port_file.read_text():
                    target = f"127.0.0.1:{port_file.read_text()}"
                if target and _serving(target):
                    break
                time.sleep(0.1)
            yield target
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
