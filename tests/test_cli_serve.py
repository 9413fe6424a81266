"""`sdserve serve` as a real process tree: the sidecar's flags, imports, a dead child, and a clean stop."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve import Client
from service.tiny import build_tiny
from tests.harness import TINY
from tests.procs import busy_port

CLI = [sys.executable, "-m", "sdserve.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """A running `sdserve serve`, in its own session (like a shell job), with its stderr read line by line."""

    def __init__(self, cwd: Path, *args: str):
        env = dict(os.environ, SDSERVE_LOG_FORMAT="json", SDSERVE_MANAGER_LOG_FORMAT="json")
        self.proc = subprocess.Popen(
            [*CLI, "serve", *args],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._new.put(self.lines[-1])
        self._new.put(None)

    def wait_line(self, match: Callable[[str], bool], timeout: float = 180.0) -> str:
        """The next stderr line that matches; fails if the process ends or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"no matching line in {timeout}s:\n" + "\n".join(self.lines[-30:])) from None
            if line is None:
                raise AssertionError(f"sdserve serve exited with {self.proc.wait()}:\n" + "\n".join(self.lines[-30:]))
            if match(line):
                return line

    def finish(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(30)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # the children get SIGTERM from the kernel (parent-death signal) and drain
            self.proc.wait(30)


def record(line: str) -> dict[str, Any]:
    """A JSON log record, or {} for any other line."""
    if not line.startswith("{"):
        return {}
    value = json.loads(line)
    return value if isinstance(value, dict) else {}


def logged(logger: str, msg: str) -> Callable[[str], bool]:
    return lambda line: record(line).get("logger") == logger and record(line).get("msg") == msg


def manager_serving(port: int) -> str:
    """Waits (gRPC wait_for_ready, bounded) until the sidecar answers its health check."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=120, wait_for_ready=True
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


@pytest.fixture(scope="module")
def served(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, str, int, Path]]:
    """`sdserve serve` started in a scratch folder with default import roots: (serve, target, manager port, folder)."""
    cwd = tmp_path_factory.mktemp("serve-cwd")
    manager_port = free_port()
    serve = Serve(
        cwd,
        "--port", "0",
        "--http-port", "0",
        "--model-dirs", str(models_dir),
        "--model", TINY,
        "--metrics-port", "-1",
        "--store", str(cwd / "store"),
        "--manager-port", str(manager_port),
        "--manager-metrics-port", "-1",
    )  # fmt: skip
    try:
        port = record(serve.wait_line(logged("service.server", "listening")))["port"]
        serve.wait_line(logged("service.server", "serving"))
        yield serve, f"127.0.0.1:{port}", manager_port, cwd
    finally:
        serve.close()


def test_models_import_works_under_serve_as_the_readme_shows(served: tuple[Serve, str, int, Path]) -> None:
    _, target, manager_port, cwd = served
    build_tiny(cwd / "checkpoints" / "my-model", seed=3)
    manager = ["--manager", f"127.0.0.1:{manager_port}"]
    # A relative path, from the folder `sdserve serve` started in: inside the default import roots.
    proc = subprocess.run(
        [*CLI, "models", "import", "checkpoints/my-model", "--name", "mine", "--quiet", *manager],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("imported mine@")
    with Client(target) as c:
        assert c.generate("x", steps=1).image.width == 64


def test_model_commands_print_json(served: tuple[Serve, str, int, Path]) -> None:
    manager = ["--manager", f"127.0.0.1:{served[2]}", "--json"]

    def models(*args: str) -> Any:
        argv = [*CLI, "models", *args, *manager]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert models("alias", "set", "spare", "mine")["alias"]["model"] == "mine"
    assert [m["name"] for m in models("list")["models"]] == ["mine"]
    assert models("show", "mine")["variants"][0]["name"] == "mine"
    assert models("alias", "rm", "spare")["removed"]["name"] == "spare"


def test_serve_opens_the_http_port_and_forwards_model_manager_reads(served: tuple[Serve, str, int, Path]) -> None:
    serve = served[0]
    listening = next(line for line in serve.lines if logged("service.server", "listening")(line))
    http_port = record(listening)["http_port"]
    assert http_port > 0
    for rpc in ("DiffusionService/ListModels", "ModelManagerService/ListStoredModels"):
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/sdserve.v1.{rpc}", data=b"{}", headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
        # proto3 JSON leaves out empty lists: the store may hold nothing yet, the server always has a model.
        assert isinstance(answer, dict) and ("models" in answer or rpc.startswith("ModelManager"))


def test_a_dead_sidecar_is_restarted_and_sigterm_stops_the_server_first_with_status_0(
    served: tuple[Serve, str, int, Path],
) -> None:
    serve, target, manager_port, _ = served
    sidecar = next(p for p in psutil.Process(serve.proc.pid).children() if "model_manager" in p.cmdline())
    sidecar.send_signal(signal.SIGKILL)
    said = serve.wait_line(lambda line: line.startswith("sdserve: "))
    assert said == "sdserve: the model manager was killed by SIGKILL; restarting it (the server keeps serving)"
    assert manager_serving(manager_port) == "SERVING"
    with Client(target) as c:
        assert c.generate("x", steps=1).image.width == 64
    restarted = len(serve.lines)

    # To the whole process group, as `kill -TERM -PGID` or a terminal's Ctrl-C (SIGINT, handled alike) does: the
    # children run in their own group, so only `sdserve serve` gets it and passes it to the server alone.
    os.killpg(serve.proc.pid, signal.SIGTERM)
    assert serve.finish() == 0, "\n".join(serve.lines[-20:])
    after = serve.lines[restarted:]
    server_stopped = next(i for i, line in enumerate(after) if logged("service.server", "stopped")(line))
    manager_stopping = next(i for i, line in enumerate(after) if logged("model_manager.server", "stopping")(line))
    assert server_stopped < manager_stopping, "the sidecar must stop after the server has drained"
    assert not [line for line in after if line.startswith(("sdserve:", "Traceback"))]


def test_a_sidecar_that_cannot_start_stops_serve_with_one_line(models_dir: Path, tmp_path: Path) -> None:
    with busy_port() as taken:
        serve = Serve(
            tmp_path,
            "--port", "0",
            "--http-port", "-1",
            "--model-dirs", str(models_dir),
            "--model", TINY,
            "--metrics-port", "-1",
            "--store", str(tmp_path / "store"),
            "--manager-port", str(free_port()),
            "--manager-metrics-port", str(taken),
            "--", "--manager-wait-seconds", "1",
        )  # fmt: skip
        try:
            assert serve.finish() == 1
        finally:
            serve.close()
    ours = [line for line in serve.lines if line.startswith("sdserve:")]
    assert ours == ["sdserve: the model manager exited with code 1 before it was ready; stopping the server"]
    assert any(f"127.0.0.1:{taken}" in line and "in use" in line for line in serve.lines), serve.lines[-5:]
    assert not any("Traceback" in line for line in serve.lines)


def test_a_busy_server_metrics_port_is_one_line_and_a_non_zero_exit(models_dir: Path, tmp_path: Path) -> None:
    with busy_port() as taken:
        serve = Serve(
            tmp_path,
            "--port", "0", "--http-port", "-1", "--model-dirs", str(models_dir), "--model", TINY,
            "--metrics-port", str(taken), "--no-manager",
        )  # fmt: skip
        try:
            assert serve.finish() == 1
        finally:
            serve.close()
    assert serve.lines[
        0
    ] == f"python -m service: error: --metrics-port {taken}: cannot listen on 127.0.0.1:{taken}: " + (
        "Address already in use"
    )
    assert serve.lines[-1] == "sdserve: the server exited with code 1"
    assert not any("Traceback" in line for line in serve.lines)
