"""Stored adapters (LoRA and textual-inversion files) at <store>/adapters/<name>/: import, Hub pull, list, verify,
delete and scrub, each published atomically from staging/ like a model variant."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from model_manager import errors
from model_manager.errors import FieldViolation
from model_manager.hub import HubUnreachable, RemoteFile, RepoSnapshot
from model_manager.manifest import fsync_dir, fsync_tree
from model_manager.names import NAME_RULE, hub_revision_problem, name_problem, repo_id_problem
from model_manager.progress import Reporter
from sdserve_core import adapter_file as af

if TYPE_CHECKING:
    from model_manager.ops import Operations

log = logging.getLogger(__name__)

README = "README.md"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class AdapterImport:
    """Store the local file `path` as adapter `name` (empty: the file's stem)."""

    path: str
    name: str = ""
    token: str = ""
    replace: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterPull:
    """Store `filename` (empty: the only .safetensors file) of Hub `repo_id` at `revision` as adapter `name`."""

    repo_id: str
    revision: str = "main"
    filename: str = ""
    name: str = ""
    token: str = ""
    replace: bool = False


@dataclasses.dataclass(frozen=True)
class StoredAdapter:
    """A published adapter: its manifest, folder, publication time and the last verification problem ('' if none)."""

    manifest: af.Manifest
    path: Path
    created_at: float
    error: str = ""


@dataclasses.dataclass(frozen=True)
class AdapterResult:
    """The outcome of an adapter import or pull."""

    adapter: StoredAdapter
    already_present: bool = False
    replaced: bool = False
    downloaded_bytes: int = 0
    resumed_bytes: int = 0


def _check_request_fields(name: str, token: str, violations: list[FieldViolation]) -> None:
    problem = name_problem(name) if name else None
    if problem:
        violations.append(FieldViolation("name", f"{name!r} {problem}"))
    problem = af.token_problem(token) if token else None
    if problem:
        violations.append(FieldViolation("token", f"{token!r} {problem}"))


def check_import(req: AdapterImport) -> AdapterImport:
    """INVALID_ARGUMENT naming every bad field of an ImportAdapter request."""
    violations: list[FieldViolation] = []
    if not req.path:
        violations.append(FieldViolation("path", "is required"))
    elif "\0" in req.path:
        violations.append(FieldViolation("path", "must not contain NUL characters"))
    _check_request_fields(req.name, req.token, violations)
    if violations:
        raise errors.invalid(*violations)
    return req


def check_pull(req: AdapterPull) -> AdapterPull:
    """INVALID_ARGUMENT naming every bad field of a PullAdapter request; the revision defaults to main."""
    violations: list[FieldViolation] = []
    problem = repo_id_problem(req.repo_id)
    if problem:
        violations.append(FieldViolation("repo_id", problem))
    req = dataclasses.replace(req, revision=req.revision or "main")
    problem = hub_revision_problem(req.revision)
    if problem:
        violations.append(FieldViolation("revision", problem))
    if req.filename and (".." in req.filename.split("/") or req.filename.startswith("/") or "\0" in req.filename):
        violations.append(FieldViolation("filename", "must be a relative path inside the repository"))
    _check_request_fields(req.name, req.token, violations)
    if violations:
        raise errors.invalid(*violations)
    return req


def _format_error(field: str, exc: af.AdapterFormatError) -> errors.InvalidArgument:
    return errors.invalid_field(field, str(exc))


def pick_file(snap: RepoSnapshot, filename: str) -> RemoteFile:
    """The repository file to store: `filename`, else its only .safetensors file; INVALID_ARGUMENT otherwise."""
    where = f"{snap.repo_id}@{snap.commit[:12]}"
    if filename:
        if filename.lower().endswith(af.PICKLE_SUFFIXES) or not filename.endswith(".safetensors"):
            raise errors.invalid_field("filename", f"{filename}: {af.PICKLE_RULE}")
        try:
            return snap.file(filename)
        except KeyError:
            raise errors.NotFound(f"filename: {where} has no file {filename!r}") from None
    candidates = sorted(f.path for f in snap.files if f.path.endswith(".safetensors"))
    if len(candidates) == 1:
        return snap.file(candidates[0])
    if candidates:
        shown = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
        raise errors.invalid_field("filename", f"is required: {where} has several .safetensors files ({shown})")
    pickled = sorted(f.path for f in snap.files if f.path.lower().endswith(af.PICKLE_SUFFIXES))
    if pickled:
        raise errors.invalid_field("repo_id", f"{where} has only {', '.join(pickled[:5])}: {af.PICKLE_RULE}")
    raise errors.invalid_field("repo_id", f"{where} has no .safetensors file")


class AdapterStore:
    """The adapters of one store. Operations run in the calling (worker) thread; one per name at a time."""

    def __init__(self, ops: Operations):
        self.ops = ops
        self.layout = ops.store.layout
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    # ---- reading -------------------------------------------------------------------------

    def _read(self, folder: Path) -> StoredAdapter | None:
        try:
            manifest = af.read_manifest(folder)
            created = folder.stat().st_mtime
        except (af.AdapterFormatError, OSError) as exc:
            log.warning("ignoring an unreadable adapter folder", extra={"path": str(folder), "error": str(exc)})
            return None
        with self._lock:
            error = self._errors.get(folder.name, "")
        return StoredAdapter(manifest, folder, created, error)

    def entries(self) -> list[StoredAdapter]:
        """Every stored adapter, sorted by name (folders without a readable adapter.json are skipped)."""
        if not self.layout.adapters.is_dir():
            return []
        out = []
        for folder in sorted(self.layout.adapters.iterdir()):
            if folder.is_dir() and name_problem(folder.name) is None:
                found = self._read(folder)
                if found is not None:
                    out.append(found)
        return out

    def get(self, name: str) -> StoredAdapter:
        """The adapter `name`; NOT_FOUND naming the field when it is not stored."""
        folder = self.layout.adapter_dir(name)
        found = self._read(folder) if folder.is_dir() else None
        if found is None:
            raise errors.NotFound(f"name: adapter {name!r} is not in the store")
        return found

    def problems(self, adapter: StoredAdapter) -> list[str]:
        """What is wrong with the adapter's files against adapter.json (reads the whole weights file); [] if nothing."""
        m = adapter.manifest
        path = adapter.path / af.WEIGHTS
        if not path.is_file() or path.is_symlink():
            return [f"{af.WEIGHTS}: missing or not a regular file (listed in {af.MANIFEST})"]
        size = path.stat().st_size
        if size != m.file.size_bytes:
            return [f"{af.WEIGHTS}: {size} bytes, {af.MANIFEST} says {m.file.size_bytes} (truncated or changed)"]
        digest = af.sha256_file(path)
        if digest != m.sha256:
            return [
                f"{af.WEIGHTS}: sha256 {digest[:16]}… does not match {af.MANIFEST}'s {m.sha256[:16]}… "
                "(every file must keep its recorded sha256)"
            ]
        return []

    def verify(self, name: str) -> StoredAdapter:
        """Re-hashes the adapter's weights; DATA_LOSS naming the file and the rule on a mismatch (recorded as its
        `error` until it verifies again or is replaced)."""
        adapter = self.get(name)
        problems = self.problems(adapter)
        with self._lock:
            if problems:
                self._errors[name] = "; ".join(problems)
            else:
                self._errors.pop(name, None)
        if problems:
            log.error("adapter does not match its manifest", extra={"adapter": name, "problems": problems})
            raise errors.DataLoss(f"adapter {name!r} is corrupt: {'; '.join(problems)}")
        return dataclasses.replace(adapter, error="")

    def scrub(self, stop: threading.Event | None = None) -> tuple[int, int]:
        """Verifies every stored adapter; returns (checked, corrupt)."""
        checked = corrupt = 0
        for adapter in self.entries():
            if stop is not None and stop.is_set():
                break
            checked += 1
            try:
                self.verify(adapter.manifest.name)
            except errors.DataLoss:
                corrupt += 1
            except errors.NotFound:
                checked -= 1
        return checked, corrupt

    def usage(self) -> tuple[int, int]:
        """(stored adapters, bytes of their weights files)."""
        adapters = self.entries()
        return len(adapters), sum(a.manifest.file.size_bytes for a in adapters)

    # ---- writing -------------------------------------------------------------------------

    def delete(self, name: str) -> StoredAdapter:
        """Removes the adapter (renamed into staging/, then deleted there); NOT_FOUND when it is not stored."""
        self.ops.store.check_writable(f"removing the adapter {name}")
        with self.ops._name_lock(f"adapter/{name}", Reporter(lambda _p: None)):
            adapter = self.get(name)
            trash = self.layout.trash_path()
            os.rename(adapter.path, trash)
            fsync_dir(self.layout.adapters)
            with self._lock:
                self._errors.pop(name, None)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("adapter removed", extra={"adapter": name})
        return adapter

    def _existing(self, name: str, replace: bool) -> StoredAdapter | None:
        """The adapter stored as `name`, if any; ALREADY_EXISTS when there is one and `replace` is off."""
        folder = self.layout.adapter_dir(name)
        existing = self._read(folder) if folder.is_dir() else None
        if existing is not None and not replace:
            raise errors.AlreadyExists(
                f"name: adapter {name!r} is already in the store ({existing.manifest.source}); choose another name or "
                "set replace"
            )
        return existing

    def _publish(self, staging: Path, manifest: af.Manifest, rep: Reporter) -> tuple[StoredAdapter, bool]:
        """Writes adapter.json, checks the weights against it, and renames the staging folder into place (replacing
        an adapter of the same name through staging/); returns (the adapter, whether one was replaced)."""
        af.write_manifest(staging, manifest)
        rep.stage("verifying", manifest.file.size_bytes)
        digest = af.sha256_file(staging / af.WEIGHTS, rep.advance)
        if digest != manifest.sha256:
            raise errors.ChecksumMismatch(f"{af.WEIGHTS}: changed while it was stored; nothing was published")
        rep.stage("publishing")
        fsync_tree(staging)
        target = self.layout.adapter_dir(manifest.name)
        trash: Path | None = None
        if target.exists():
            trash = self.layout.trash_path()
            os.rename(target, trash)
        os.rename(staging, target)
        fsync_dir(self.layout.adapters)
        with self._lock:
            self._errors.pop(manifest.name, None)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        log.info("adapter published", extra={"adapter": manifest.name, "bytes": manifest.file.size_bytes})
        return StoredAdapter(manifest, target, time.time()), trash is not None

    @contextlib.contextmanager
    def _writing(self, name: str, nbytes: int, label: str, rep: Reporter) -> Iterator[Path]:
        """Holds the name, room for `nbytes` on the disk, and a staging folder (removed unless published)."""
        self.ops.store.check_writable(f"storing the adapter {name}")
        with (
            self.ops._name_lock(f"adapter/{name}", rep),
            self.ops.store.reserve(nbytes, label),
            self.ops._staging(f"adapter-{name}") as staging,
        ):
            try:
                yield staging
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                raise errors.DiskFull(f"the store's disk filled up {label}; nothing was published") from None

    def _finish(
        self, staging: Path, name: str, source: str, token: str, replace: bool, rep: Reporter, field: str
    ) -> AdapterResult:
        """Describes the staged weights, and publishes them unless the same adapter is already stored."""
        try:
            manifest = af.describe(staging / af.WEIGHTS, name, source, token)
        except af.AdapterFormatError as exc:
            raise _format_error(field, exc) from None
        existing = self._existing(name, replace=True)
        if existing is not None:
            same = existing.manifest.sha256 == manifest.sha256 and existing.manifest.file == manifest.file
            # The same weights again: nothing to do, unless the stored copy no longer matches (then this repairs it).
            if same and not self.problems(existing):
                return AdapterResult(existing, already_present=True)
            if not same and not replace:
                self._existing(name, replace=False)
        adapter, replaced = self._publish(staging, manifest, rep)
        return AdapterResult(adapter, replaced=replaced)

    # ---- import --------------------------------------------------------------------------

    def import_adapter(self, req: AdapterImport, rep: Reporter) -> AdapterResult:
        """Copies a local .safetensors adapter file into the store."""
        with self.ops.metrics.operation("import_adapter"):
            return self._import(req, rep)

    def _import(self, req: AdapterImport, rep: Reporter) -> AdapterResult:
        path = self.ops._import_path(req.path, "path")
        if path.is_dir():
            raise errors.invalid_field("path", f"{path} is a folder; name the adapter's .safetensors file")
        try:
            af.refuse_pickle(path)
            af.inspect(path, req.token)
        except af.AdapterFormatError as exc:
            raise _format_error("path", exc) from None
        name = req.name or path.name.removesuffix(".safetensors")
        if name_problem(name):
            raise errors.invalid_field("name", f"{name!r} cannot be an adapter name ({NAME_RULE}); pass a name")
        size = path.stat().st_size
        with self._writing(name, size, f"importing {path.name}", rep) as staging:
            rep.stage("copying", size)
            rep.file(path.name)
            with path.open("rb") as src, (staging / af.WEIGHTS).open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    rep.advance(len(chunk))
            rep.finish_stage()
            return self._finish(staging, name, f"file:{path}", req.token, req.replace, rep, "path")

    # ---- pull ----------------------------------------------------------------------------

    def pull_adapter(self, req: AdapterPull, rep: Reporter) -> AdapterResult:
        """Downloads one adapter file from the Hub (resuming, verified against the Hub's sha256) into the store."""
        with self.ops.metrics.operation("pull_adapter"):
            return self._pull(req, rep)

    def _pull(self, req: AdapterPull, rep: Reporter) -> AdapterResult:
        name = req.name or req.repo_id.split("/")[-1]
        if name_problem(name):
            raise errors.invalid_field(
                "name", f"the repository's name {name!r} is not a valid adapter name; pass a name"
            )
        rep.stage("resolving", message=f"{req.repo_id}@{req.revision}")
        if self.ops.settings.offline:
            raise errors.Unavailable(f"offline mode is on; cannot pull {req.repo_id}")
        try:
            snap = self.ops.hub.resolve(req.repo_id, req.revision)
        except HubUnreachable as exc:
            raise errors.Unavailable(f"the Hub cannot be reached ({exc}); {req.repo_id} was not pulled") from None
        remote = pick_file(snap, req.filename)
        readme = next((f for f in snap.files if f.path == README), None)
        total = remote.size + (readme.size if readme is not None else 0)
        downloaded = resumed = 0

        def received(n: int) -> None:
            nonlocal downloaded
            downloaded += n
            self.ops.metrics.downloaded_bytes.inc(n)
            rep.advance(n)

        def had(n: int) -> None:
            nonlocal resumed
            resumed += n
            rep.advance(n, resumed=True)

        with self._writing(name, total, f"pulling {req.repo_id}", rep) as staging:
            rep.stage("downloading", total)
            for file, dest in ((remote, af.WEIGHTS), (readme, README)):
                if file is not None:
                    rep.file(file.path)
                    self.ops.hub.download(snap, file, staging / dest, received, rep.cancel, had)
            rep.finish_stage()
            source = f"hub:{req.repo_id}@{snap.commit}/{remote.path}"
            result = self._finish(staging, name, source, req.token, req.replace, rep, "filename")
        return dataclasses.replace(result, downloaded_bytes=downloaded, resumed_bytes=resumed)
