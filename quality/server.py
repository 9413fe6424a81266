"""Starts `python -m service` (and, for stored variants, `python -m model_manager`) on port 0 for an evaluation run."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve import Client


@contextlib.contextmanager
def _process(module: str, flags: Sequence[str], ready: Callable[[str], bool], timeout: float) -> Iterator[str]:
    """Runs `python -m module --port 0 --port-file F *flags`; yields its target once `ready(target)`."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        log_path = Path(tmp) / f"{module}.log"
        log = log_path.open("w")
        cmd = [sys.executable, "-m", module, "--port", "0", "--port-file", str(port_file), *flags]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            target = ""
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{module} exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{module} did not become ready within {timeout:.0f} s")
                if not target and port_file.exists() and port_file.read_text():
                    target = f"127.0.0.1:{port_file.read_text()}"
                if target and ready(target):
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


@contextlib.contextmanager
def running_server(*flags: str, timeout: float = 300.0) -> Iterator[str]:
    """Yields the target of a fresh server on the default model dirs; bounded wait for SERVING."""
    common = ("--metrics-port", "-1", "--log-format", "text")
    with _process("service", (*common, *flags), _serving, timeout) as target:
        yield target


@contextlib.contextmanager
def running_sidecar(store: Path, import_roots: Sequence[Path], timeout: float = 120.0) -> Iterator[str]:
    """Yields the target of a fresh model-manager sidecar with its own store (serving once its port is written)."""
    flags = (
        "--store", str(store),
        "--host", "127.0.0.1",
        "--metrics-port", "-1",
        "--log-format", "text",
        "--min-free-bytes", "0",
        "--import-roots", ":".join(str(r) for r in import_roots),
    )  # fmt: skip
    with _process("model_manager", flags, lambda _target: True, timeout) as target:
        yield target


def wait_for_models(target: str, names: Sequence[str], timeout: float = 120.0) -> None:
    """Bounded wait until the server's ListModels shows every name (model or alias)."""
    deadline = time.monotonic() + timeout
    with Client(target) as c:
        while True:
            models, _ = c.list_models()
            known = {m.name for m in models} | {a for m in models for a in m.aliases}
            missing = set(names) - known
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server never listed {sorted(missing)}")
            time.sleep(0.2)


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
