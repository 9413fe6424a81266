"""Start-up refusals shared by the server and the sidecar (sdserve_core.startup, sdserve_core.tls): one line that
names the flag or file, exit status 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import busy_port

PROGRAMS = {"service": ["--metrics-port", "-1"], "model_manager": ["--metrics-port", "-1", "--store"]}


def run(module: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    base = PROGRAMS[module] + ([str(tmp_path / "store")] if module == "model_manager" else [])
    return subprocess.run(
        [sys.executable, "-m", module, "--log-format", "text", *base, *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], module: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"python -m {module}: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("module", list(PROGRAMS))
def test_an_unreadable_tls_file_is_one_line(module: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "key.pem"
    proc = run(module, tmp_path, "--port", "0", "--tls-cert-file", str(missing), "--tls-key-file", str(missing))
    line = one_error_line(proc, module)
    assert f"cannot read a TLS file: {missing}: No such file or directory" in line


@pytest.mark.parametrize("module", list(PROGRAMS))
def test_a_busy_grpc_port_is_one_line_naming_the_flag(module: str, tmp_path: Path) -> None:
    with busy_port() as port:
        proc = run(module, tmp_path, "--host", "127.0.0.1", "--port", str(port))
    line = one_error_line(proc, module)
    assert f"--port: cannot listen on 127.0.0.1:{port}" in line
