"""The sidecar's side of the manifest: reading one, hashing a folder into FileRecords, durable JSON writes and fsync."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdserve_core.manifest import HASHES, MANIFEST, FileRecord, HashCache, Manifest, list_files, sha256_file


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a variant folder; raises ValueError (missing or malformed)."""
    try:
        return Manifest.from_json((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}") from None


def hash_folder(
    folder: Path, on_bytes: Callable[[int], None] | None = None, cache: HashCache | None = HASHES
) -> tuple[FileRecord, ...]:
    """A FileRecord for every file under `folder` (symbolic links are refused)."""
    records = []
    for rel in list_files(folder):
        path = folder / rel
        if path.is_symlink():
            raise ValueError(f"{rel} is a symbolic link; stored models hold regular files only")
        digest = cache.digest(path, on_bytes, rehash=True) if cache is not None else sha256_file(path, on_bytes)
        records.append(FileRecord(rel, path.stat().st_size, digest))
    return tuple(records)


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
