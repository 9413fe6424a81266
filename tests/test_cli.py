"""The sdserve CLI against a real server: files written, progress shown, one-line errors (serve: test_cli_serve)."""

from __future__ import annotations

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
