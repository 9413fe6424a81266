"""Runs `python -m service` as a child process: spawn, wait for SERVING (timed), peak RSS, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Reconnect quickly while the child starts up, so the SERVING moment is seen within ~0.1 s.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 100)]


def free_port() -> int:
    """A port that was free a moment ago (the child binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM), else its current RSS."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(psutil.Process(pid).memory_info().rss)


class ServerProcess:
    """One sdserve server child process; `cold_start_s` is spawn to health SERVING."""

    def __init__(self, model: str, model_dirs: list[Path], log_path: Path, flags: list[str]):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cold_start_s = float("nan")
        args = [
            sys.executable,
            "-m",
            "service",
            "--port",
            str(self.port),
            "--model-dirs",
            ":".join(str(d) for d in model_dirs),
            "--default-model",
            model,
            "--metrics-port",
            "-1",
            "--log-format",
            "json",
            *flags,
        ]
        self.args = args
        self._log = log_path.open("w")
        self._spawned = time.perf_counter()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout: float = 1800.0) -> float:
        """Blocks on the health Watch stream until SERVING; returns seconds since spawn."""
        channel = grpc.insecure_channel(self.target, options=FAST_RECONNECT)
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
        )

        def watch_exit() -> None:
            self.proc.wait()
            call.cancel()

        threading.Thread(target=watch_exit, daemon=True).start()
        try:
            for resp in call:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    self.cold_start_s = time.perf_counter() - self._spawned
                    call.cancel()
                    return self.cold_start_s
        except grpc.RpcError as err:
            raise RuntimeError(
                f"sdserve did not reach SERVING ({err.code().name}; exit code {self.proc.poll()}): {self.log_tail()}"
            ) from None
        finally:
            channel.close()
        raise RuntimeError(f"the health stream ended before SERVING: {self.log_tail()}")

    def peak_rss(self) -> int:
        return peak_rss(self.proc.pid)

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        """SIGTERM (drain, nothing is in flight), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
