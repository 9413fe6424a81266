"""The per-variant manifest: provenance, quality and the size and sha256 of every file; hashing and verification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One file of a variant: path relative to the variant folder (with '/'), size and sha256."""

    path: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a variant's weights came from (kind: hub, local_folder, single_file or derived)."""

    kind: str
    repo_id: str = ""
    requested_revision: str = ""
    commit: str = ""
    path: str = ""
    architecture: str = ""
    derived_from: str = ""


@dataclasses.dataclass(frozen=True)
class Quality:
    """Image PSNR against the fp32 variant (psnr_db None: not measured, see note)."""

    psnr_db: float | None
    seed: int = 0
    steps: int = 0
    width: int = 0
    height: int = 0
    device: str = ""
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything recorded about one published variant."""

    name: str
    revision: str
    variant: str
    description: str
    source: Source
    files: tuple[FileRecord, ...]
    created_at: float
    unet_in_channels: int = 4
    quality: Quality | None = None
    format: int = FORMAT

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["files"] = [dataclasses.asdict(f) for f in self.files]
        return json.dumps(data, indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Manifest:
        """Parses a manifest; raises ValueError saying what is wrong."""
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            quality = data.get("quality")
            for f in data["files"]:
                parts = str(f["path"]).split("/")
                if not f["path"] or str(f["path"]).startswith("/") or ".." in parts or "" in parts:
                    raise ValueError(f"file path {f['path']!r} leaves the variant folder")
            return Manifest(
                name=str(data["name"]),
                revision=str(data["revision"]),
                variant=str(data["variant"]),
                description=str(data.get("description", "")),
                source=Source(**data["source"]),
                files=tuple(FileRecord(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]),
                created_at=float(data["created_at"]),
                unet_in_channels=int(data.get("unet_in_channels", 4)),
                quality=Quality(**quality) if quality else None,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed manifest: {exc}") from None


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a variant folder; raises ValueError (missing or malformed)."""
    try:
        return Manifest.from_json((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}") from None


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, calling on_bytes(n) per chunk read."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Relative paths (with '/') of every regular file under `folder` except the manifest, sorted."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def hash_folder(folder: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[FileRecord, ...]:
    """A FileRecord for every file under `folder` (symbolic links are refused)."""
    records = []
    for rel in list_files(folder):
        path = folder / rel
        if path.is_symlink():
            raise ValueError(f"{rel} is a symbolic link; stored models hold regular files only")
        records.append(FileRecord(rel, path.stat().st_size, sha256_file(path, on_bytes)))
    return tuple(records)


def verify(
    folder: Path, manifest: Manifest, full: bool = True, on_bytes: Callable[[int], None] | None = None
) -> list[str]:
    """Problems found comparing `folder` with its manifest (sizes always, sha256 when `full`); empty when it matches."""
    problems = []
    expected = {f.path: f for f in manifest.files}
    present = set(list_files(folder))
    for rel in sorted(present - expected.keys()):
        problems.append(f"{rel}: not in the manifest")
    for rel, record in sorted(expected.items()):
        path = folder / rel
        if rel not in present:
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != record.size:
            problems.append(f"{rel}: {size} bytes, manifest says {record.size} (truncated or changed)")
            continue
        if full:
            digest = sha256_file(path, on_bytes)
            if digest != record.sha256:
                problems.append(f"{rel}: sha256 {digest[:16]}… does not match the manifest's {record.sha256[:16]}…")
    return problems


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to a temporary file beside `path`, fsyncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Makes a rename or create in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsyncs every file and folder under `folder` (before it is renamed into place)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(folder)
