"""Test certificates made with the openssl CLI: a CA, a server cert for 127.0.0.1, client certs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key.name,
        "-out",
        cert.name,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    return key, cert


def make_leaf(folder: Path, name: str, ca: tuple[Path, Path], server: bool) -> tuple[Path, Path]:
    key, csr, cert, ext = (
        folder / f"{name}.key",
        folder / f"{name}.csr",
        folder / f"{name}.pem",
        folder / f"{name}.ext",
    )
    _run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key.name,
        "-out",
        csr.name,
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    usage = "serverAuth" if server else "clientAuth"
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else ""
    ext.write_text(f"{san}extendedKeyUsage={usage}\n")
    _run(
        "x509",
        "-req",
        "-in",
        csr.name,
        "-CA",
        ca[1].name,
        "-CAkey",
        ca[0].name,
        "-CAcreateserial",
        "-out",
        cert.name,
        "-days",
        "2",
        "-extfile",
        ext.name,
        cwd=folder,
    )
    return key, cert


def require_openssl() -> None:
    if shutil.which("openssl") is None:
        raise AssertionError("openssl is required for the TLS tests (Debian package openssl)")
