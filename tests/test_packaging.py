"""The two distributions as wheels: what each carries, and how each behaves installed outside the checkout."""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

import sdserve
from service.settings import REPO_ROOT

CLIENT_DIR = REPO_ROOT / "clients" / "python"
# What each distribution is built from: the build runs on a copy of these, so the checkout stays untouched.
SERVER_SOURCES = ("pyproject.toml", "README.md", "service", "model_manager", "sdserve_core", "models")
CLIENT_SOURCES = ("pyproject.toml", "README.md", "sdserve")
MODELS = ("shapes", "shapes-inpainting")
EMBEDDED = (*MODELS, "adapters")


def copy_sources(src: Path, names: tuple[str, ...], dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name, ignore=ignore)
        else:
            shutil.copy2(src / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both wheels, built offline with the setuptools already installed (no build isolation, no index)."""
    tmp = tmp_path_factory.mktemp("wheels")
    server = copy_sources(REPO_ROOT, SERVER_SOURCES, tmp / "server-src")
    client = copy_sources(CLIENT_DIR, CLIENT_SOURCES, tmp / "client-src")
    out = tmp / "dist"
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *offline, "-w", str(out), str(server), str(client)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"server": next(out.glob("sdserve_server-*.whl")), "client": next(out.glob("sdserve-*.whl"))}


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def top_level(wheel: Path) -> set[str]:
    return {n.split("/")[0] for n in names(wheel) if ".dist-info/" not in n}


def test_client_wheel_carries_only_sdserve(wheels: dict[str, Path]) -> None:
    files = names(wheels["client"])
    assert top_level(wheels["client"]) == {"sdserve"}
    assert {"sdserve/cli.py", "sdserve/py.typed", "sdserve/v1/diffusion_pb2.pyi"} <= set(files)
    meta = metadata(wheels["client"])
    assert (meta["Name"], meta["Version"]) == ("sdserve", sdserve.__version__)
    requires = meta.get_all("Requires-Dist") or []
    assert not [r for r in requires if r.startswith(("torch", "diffusers")) and "extra" not in r]
    assert f'sdserve-server=={sdserve.__version__}; extra == "server"' in requires


def test_server_wheel_carries_the_server_the_sidecar_and_the_embedded_models(wheels: dict[str, Path]) -> None:
    files = set(names(wheels["server"]))
    assert top_level(wheels["server"]) == {"service", "model_manager", "sdserve_core"}
    for model in EMBEDDED:
        shipped = {p.relative_to(REPO_ROOT / "models").as_posix() for p in (REPO_ROOT / "models" / model).rglob("*")}
        shipped = {p for p in shipped if (REPO_ROOT / "models" / p).is_file()}
        assert shipped and {f"service/embedded_models/{p}" for p in shipped} <= files, model
    configs = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "model_manager" / "configs").rglob("*.json")}
    assert configs and configs <= files
    page = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "service" / "web").rglob("*") if p.is_file()}
    assert "service/web/index.html" in page and page <= files, "the playground page is not in the wheel"
    meta = metadata(wheels["server"])
    assert meta["Name"] == "sdserve-server"
    assert f"sdserve=={sdserve.__version__}" in (meta.get_all("Requires-Dist") or [])
    client_project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert client_project["version"] == sdserve.__version__ == meta["Version"]


def venv_with(tmp: Path, *wheels: Path) -> Path:
    """A fresh venv holding the wheels' files (pure-Python wheels install by unpacking into site-packages). Their
    third-party dependencies come from this test's environment through a .pth line, which adds that site-packages
    folder but not its editable-install hooks: the checkout's own packages stay out of reach."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True, timeout=120)
    python = tmp / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_installed_server_finds_its_embedded_models(wheels: dict[str, Path], tmp_path: Path) -> None:
    python = venv_with(tmp_path / "venv", wheels["server"], wheels["client"])
    probe = (
        "import service, sdserve; from service.settings import Settings; "
        "print(service.__file__); print(sdserve.__file__); print(Settings.from_sources([]).model_dirs[0])"
    )
    proc = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    service_file, sdserve_file, first_dir = (Path(line) for line in proc.stdout.split())
    venv = (tmp_path / "venv").resolve()
    assert service_file.resolve().is_relative_to(venv) and sdserve_file.resolve().is_relative_to(venv)
    assert first_dir.resolve().is_relative_to(venv), f"the embedded models are looked for in {first_dir}"
    for model in MODELS:
        assert (first_dir / model / "model_index.json").is_file()
        assert (first_dir / model / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_serve_in_a_client_only_install_says_how_to_get_the_server(wheels: dict[str, Path], tmp_path: Path) -> None:
    python = venv_with(tmp_path / "venv", wheels["client"])
    proc = subprocess.run(
        [str(python), "-m", "sdserve.cli", "serve"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "sdserve: error: `sdserve serve` needs the server, which is not installed here "
        "(missing: service, model_manager); install it with: pip install 'sdserve[server]'"
    ]
