"""The per-variant manifest: provenance, quality and the size and sha256 of every file; hashing (with a stat-keyed
cache) and verification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import threading
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


# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): every write to a file changes its mtime and ctime, and nothing
# in user space can set ctime back, so an unchanged key means unchanged bytes (bit rot aside: the scrub re-reads).
StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """The cache key of a file's stat."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashCache:
    """sha256 of files keyed by their StatKey, so a file whose stat is unchanged is not read again. Thread-safe.

    The key holds the inode, not the path: hashing a staging folder also covers the published folder it is
    renamed to. At most `max_entries` keys are kept (the oldest go first)."""

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._digests: dict[StatKey, str] = {}
        self.hashed_files = 0
        self.hashed_bytes = 0

    def digest(self, path: Path, on_bytes: Callable[[int], None] | None = None, rehash: bool = False) -> str:
        """The file's hex sha256: from the cache when its stat is unchanged (unless `rehash`), else read (and
        cached if the stat did not change while it was read)."""
        key = stat_key(os.stat(path))
        if not rehash:
            with self._lock:
                cached = self._digests.get(key)
            if cached is not None:
                return cached
        digest = sha256_file(path, on_bytes)
        after = stat_key(os.stat(path))
        with self._lock:
            self.hashed_files += 1
            self.hashed_bytes += key[2]
            if after == key:
                self._digests.pop(key, None)
                self._digests[key] = digest
                while len(self._digests) > self.max_entries:
                    del self._digests[next(iter(self._digests))]
        return digest

    def clear(self) -> None:
        with self._lock:
            self._digests.clear()


# One cache per process: the sidecar's publishing, start-up check, SetAlias check and scrub share it, and so do
# the server's checks before each load (verify_folder).
HASHES = HashCache()


def verify(
    folder: Path,
    manifest: Manifest,
    full: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    cache: HashCache | None = HASHES,
    rehash: bool = False,
) -> list[str]:
    """Problems found comparing `folder` with its manifest; empty when it matches.

    The rule: a variant folder holds exactly the files its manifest lists, each a regular file of the recorded
    size and (when `full`) sha256. Each problem starts with the file's relative path and names the rule it broke.
    Digests come from `cache` when a file's stat is unchanged; `rehash` reads every file again (the scrub)."""
    problems = []
    expected = {f.path: f for f in manifest.files}
    present = set(list_files(folder))
    for rel in sorted(present - expected.keys()):
        problems.append(f"{rel}: not listed in {MANIFEST} (a variant holds exactly the files its manifest lists)")
    for rel, record in sorted(expected.items()):
        path = folder / rel
        if rel not in present:
            problems.append(f"{rel}: missing (listed in {MANIFEST})")
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: not a regular file (stored models hold regular files only)")
                continue
            if st.st_size != record.size:
                problems.append(
                    f"{rel}: {st.st_size} bytes, {MANIFEST} says {record.size} (truncated or changed; "
                    "every file must keep its recorded size)"
                )
                continue
            if full:
                digest = cache.digest(path, on_bytes, rehash) if cache is not None else sha256_file(path, on_bytes)
                if digest != record.sha256:
                    problems.append(
                        f"{rel}: sha256 {digest[:16]}… does not match {MANIFEST}'s {record.sha256[:16]}… "
                        "(every file must keep its recorded sha256)"
                    )
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc.strerror or exc}; every listed file must be readable)")
    return problems


def verify_folder(folder: Path) -> list[str]:
    """Problems that make a model folder unsafe to load; an empty list means it may be loaded.

    For the server, before it loads a folder. A folder with a `manifest.json` (every variant the sidecar
    publishes) must hold exactly the files the manifest lists, each a regular file with the recorded size and
    sha256 (see `verify`); a folder without one (an unmanaged local model) is not checked and gives []. A
    manifest that cannot be read or parsed is one problem. Each problem is one line that starts with the file's
    path relative to `folder` (or `manifest.json`) and says which rule it broke, for example
    "unet/diffusion_pytorch_model.safetensors: sha256 1f2e…  does not match manifest.json's 9a8b… (every file
    must keep its recorded sha256)". Files whose (device, inode, size, mtime_ns, ctime_ns) are unchanged since
    this process last hashed them are not read again (`HASHES`), so calling it before every load costs a stat
    per file after the first time. Thread-safe; never raises for problems with the folder's contents."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not folder.is_dir():
            return [f"{folder}: not a folder"]
        return []
    except OSError as exc:
        return [f"{MANIFEST}: unreadable ({exc.strerror or exc})"]
    try:
        manifest = Manifest.from_json(text)
    except ValueError as exc:
        return [f"{MANIFEST}: {exc} (the manifest must parse)"]
    try:
        return verify(folder, manifest, full=True)
    except OSError as exc:
        return [f"{folder}: cannot be listed ({exc.strerror or exc})"]
