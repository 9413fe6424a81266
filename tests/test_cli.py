"""The sdserve CLI against a real server: files written, progress shown, one-line errors, serve + SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from sdserve import Client
from tests.harness import TINY, ServerThread, pixels, png, sample_image, sample_mask

CLI = [sys.executable, "-m", "sdserve.cli"]


def run_cli(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--target", server.target, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_generate_writes_png_and_previews(server: ServerThread, client: Client, tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    previews = tmp_path / "previews"
    proc = run_cli(
        server,
        "generate",
        "--prompt",
        "a red circle",
        "--seed",
        "5",
        "--steps",
        "3",
        "--out",
        str(out),
        "--preview-dir",
        str(previews),
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 3/3" in proc.stderr
    assert str(out) in proc.stdout and "seed=5" in proc.stdout
    expected = client.generate("a red circle", seed=5, steps=3)
    assert (pixels(out.read_bytes()) == pixels(expected.image.data)).all()
    assert sorted(p.name for p in previews.iterdir()) == ["step-0001-0.jpg", "step-0002-0.jpg", "step-0003-0.jpg"]


def test_edit_and_inpaint(server: ServerThread, tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(png(sample_image()))
    (tmp_path / "m.png").write_bytes(png(sample_mask()))
    proc = run_cli(
        server,
        "edit",
        "--image",
        str(tmp_path / "in.png"),
        "--strength",
        "0.6",
        "--prompt",
        "x",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "b.png"),
    )
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        server,
        "inpaint",
        "--image",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "m.png"),
        "--prompt",
        "y",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--out",
        str(tmp_path / "c.png"),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c-0.png").exists() and (tmp_path / "c-1.png").exists()
    assert proc.stderr == ""


def test_bad_input_is_one_line_naming_the_field(server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(server, "generate", "--prompt", "x", "--width", "100", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["sdserve: error: params.width: must be a multiple of 8; got 100"]
    assert not (tmp_path / "x.png").exists()


def test_missing_input_file(server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(server, "edit", "--image", str(tmp_path / "nope.png"), "--prompt", "x", "--out", "o.png")
    assert proc.returncode == 2
    assert "--image: cannot read" in proc.stderr


def test_unknown_model_exit_code(server: ServerThread, tmp_path: Path) -> None:
    proc = run_cli(server, "generate", "--prompt", "x", "--model", "nope", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr


def test_models_list_and_health(server: ServerThread) -> None:
    proc = run_cli(server, "models", "served")
    assert proc.returncode == 0
    assert f"* {TINY}" in proc.stdout
    proc = run_cli(server, "health")
    assert proc.returncode == 0 and proc.stdout.strip() == "SERVING"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_starts_server_and_sidecar_and_stops_both(models_dir: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    manager_port = free_port()
    env = dict(os.environ, SDSERVE_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--port",
            "0",
            "--model-dirs",
            str(models_dir),
            "--model",
            TINY,
            "--metrics-port",
            "-1",
            "--store",
            str(tmp_path / "store"),
            "--manager-port",
            str(manager_port),
            "--manager-metrics-port",
            "-1",
            "--",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        health = subprocess.run(
            [*CLI, "--target", "127.0.0.1:0", "health"], capture_output=True, text=True, timeout=60, check=False
        )
        assert health.returncode == 1  # nothing listens on port 0
        # Wait (bounded) for the port file, then for SERVING.
        for _ in range(600):
            if port_file.exists() and port_file.read_text():
                break
            try:
                proc.wait(0.1)
                raise AssertionError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
            except subprocess.TimeoutExpired:
                pass
        target = f"127.0.0.1:{port_file.read_text()}"
        ready = subprocess.run(
            [*CLI, "--target", target, "health", "--wait", "120"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert ready.stdout.strip() == "SERVING"
        with Client(target) as c:
            assert c.generate("x", steps=1).image.width == 64
        listing = subprocess.run(
            [*CLI, "models", "list", "--manager", f"127.0.0.1:{manager_port}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listing.returncode == 0, listing.stderr
        assert (tmp_path / "store").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _, err = proc.communicate()
        assert '"msg": "stopped"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
