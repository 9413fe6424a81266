"""The CLI's connection flags (before or after the command, or from SDSERVE_*), TLS, and --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_ca, make_leaf, require_openssl
from tests.harness import TINY, ServerThread, running

CLI = [sys.executable, "-m", "sdserve.cli"]
# Nothing listens on port 1: a target there fails if it is ever used.
NOWHERE = "127.0.0.1:1"


def sdserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("SDSERVE_TARGET", "SDSERVE_API_KEY")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, check=False, env={**clean, **(env or {})}
    )


def test_target_after_the_command_and_from_the_environment(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    proc = sdserve("generate", "--target", server.target, "--prompt", "x", "--steps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    # After the command wins over before it.
    proc = sdserve("--target", NOWHERE, "models", "served", "--target", server.target)
    assert proc.returncode == 0, proc.stderr
    assert f"* {TINY}" in proc.stdout
    proc = sdserve("health", env={"SDSERVE_TARGET": server.target})
    assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr
    # A flag beats the environment.
    proc = sdserve("info", "--target", server.target, env={"SDSERVE_TARGET": NOWHERE})
    assert proc.returncode == 0, proc.stderr


def test_info_is_readable_and_every_data_command_has_json(server: ServerThread, tmp_path: Path) -> None:
    proc = sdserve("info", "--target", server.target)
    assert proc.returncode == 0, proc.stderr
    labels = [line.split()[0] for line in proc.stdout.splitlines()]
    assert labels[:5] == ["server", "device", "default", "schedulers", "versions"]
    assert "{" not in proc.stdout  # not protobuf text
    assert f"default      {TINY}" in proc.stdout

    info = json.loads(sdserve("info", "--json", "--target", server.target).stdout)
    assert info["default_model"] == TINY and "DDIM" in info["schedulers"]
    assert info["limits"]["max_size"] == 2048 and isinstance(info["limits"]["max_input_pixels"], int)

    served = json.loads(sdserve("models", "served", "--json", "--target", server.target).stdout)
    assert served["default_model"] == TINY and TINY in [m["name"] for m in served["models"]]

    health = json.loads(sdserve("health", "--json", "--target", server.target).stdout)
    assert health == {"service": "", "status": "SERVING"}

    out = tmp_path / "b.png"
    proc = sdserve("generate", "--json", "--quiet", "--target", server.target, "--prompt", "x", "--seed", "3")
    assert proc.returncode == 2 and "--out" in proc.stderr  # a missing required flag: one line
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = sdserve(
        "generate", "--json", "--quiet", "--target", server.target, "--prompt", "x", "--seed", "3", "--steps", "1",
        "--out", str(out),
    )  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["images"] == [{"path": str(out), "seed": 3, "width": 64, "height": 64, "format": "png"}]
    assert result["timings"]["total"] > 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_openssl()
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    server_key, server_cert = make_leaf(folder, "server", ca, server=True)
    client_key, client_cert = make_leaf(folder, "client", ca, server=False)
    return {"ca": ca[1], "server_key": server_key, "server_cert": server_cert, "key": client_key, "cert": client_cert}


@pytest.fixture(scope="module")
def tls_server(models_dir: Path, pki: dict[str, Path]) -> Iterator[ServerThread]:
    """A server that requires mutual TLS and an API key."""
    yield from running(
        models_dir,
        tls_cert_file=str(pki["server_cert"]),
        tls_key_file=str(pki["server_key"]),
        tls_client_ca_file=str(pki["ca"]),
        api_keys=("secret",),
    )


def test_tls_flags_reach_a_mutual_tls_server(tls_server: ServerThread, pki: dict[str, Path]) -> None:
    target = tls_server.target
    mtls = ["--tls-ca-file", str(pki["ca"]), "--tls-client-cert-file", str(pki["cert"])]
    mtls += ["--tls-client-key-file", str(pki["key"])]
    proc = sdserve("info", "--target", target, *mtls, "--api-key", "secret")
    assert proc.returncode == 0, proc.stderr
    # Before the command works too; the key may come from SDSERVE_API_KEY.
    proc = sdserve("--target", target, *mtls, "models", "served", env={"SDSERVE_API_KEY": "secret"})
    assert proc.returncode == 0, proc.stderr
    proc = sdserve("health", "--target", target, *mtls, "--tls-server-name", "localhost")
    assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr

    # The server-name override is applied: a name the certificate does not carry fails the handshake.
    proc = sdserve("info", "--target", target, *mtls, "--api-key", "secret", "--tls-server-name", "wrong.example")
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr
    proc = sdserve("info", "--target", target, *mtls)
    assert proc.returncode == 1 and "UNAUTHENTICATED" in proc.stderr
    proc = sdserve("info", "--target", target, "--api-key", "secret")  # plaintext to a TLS port
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--tls-cert-file", "c.pem"], "sdserve: error: --tls-cert-file: needs --tls-key-file too"),
        (["--tls-key-file", "k.pem"], "sdserve: error: --tls-key-file: needs --tls-cert-file too"),
        (["--tls-ca-file", "/no/such.pem"], "sdserve: error: --tls-ca-file: cannot read /no/such.pem"),
        (["--target", " "], "sdserve: error: --target: must be HOST:PORT"),
        (["--wait", "-1"], "sdserve: error: --wait: must be 0 or more seconds"),
        (["--wait", "soon"], "sdserve health: error: argument --wait: invalid float value: 'soon'"),
    ],
)
def test_bad_connection_flags_are_one_line(args: list[str], line: str) -> None:
    proc = sdserve("health", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
