"""The model store: index of published variants, atomic publish and removal, aliases, pins, LRU eviction, events."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model_manager import errors
from model_manager.layout import StoreLayout
from model_manager.manifest import MANIFEST, Manifest, fsync_dir, fsync_tree, read_manifest, verify, write_json_atomic
from model_manager.names import Variant, is_safe_component

log = logging.getLogger(__name__)

READY = "ready"
CORRUPT = "corrupt"


@dataclasses.dataclass(frozen=True, order=True)
class VariantKey:
    """Identifies one stored variant."""

    name: str
    revision: str
    variant: str

    def label(self) -> str:
        return f"{self.name}@{self.revision[:12]}:{self.variant}"


@dataclasses.dataclass(frozen=True)
class StoredVariant:
    """A published variant as the store sees it now."""

    key: VariantKey
    path: Path
    manifest: Manifest | None
    state: str
    error: str
    size_bytes: int
    created_at: float
    last_used: float
    pinned: bool
    aliases: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AliasRecord:
    """An alias and the variant it points at."""

    name: str
    model: str
    revision: str
    variant: str
    updated_at: float

    @property
    def key(self) -> VariantKey:
        return VariantKey(self.model, self.revision, self.variant)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Disk usage of the store."""

    store_path: Path
    used_bytes: int
    budget_bytes: int
    protected_bytes: int
    partial_bytes: int
    free_bytes: int


@dataclasses.dataclass(frozen=True)
class Published:
    """A variant was published."""

    variant: StoredVariant


@dataclasses.dataclass(frozen=True)
class Removed:
    """A variant was removed ('deleted' or 'evicted')."""

    variant: StoredVariant
    reason: str


@dataclasses.dataclass(frozen=True)
class AliasSet:
    """An alias was set; `target` is the variant it now points at."""

    alias: AliasRecord
    target: StoredVariant
    previous: AliasRecord | None


@dataclasses.dataclass(frozen=True)
class AliasRemoved:
    """An alias was removed."""

    alias: AliasRecord


StoreEvent = Published | Removed | AliasSet | AliasRemoved


@dataclasses.dataclass(frozen=True)
class Change:
    """One numbered change of the store."""

    sequence: int
    time: float
    event: StoreEvent


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The whole store at one sequence number."""

    sequence: int
    variants: tuple[StoredVariant, ...]
    aliases: tuple[tuple[AliasRecord, StoredVariant | None], ...]
    instance_id: str


@dataclasses.dataclass(frozen=True)
class ReconcileReport:
    """What start-up reconciliation found and did."""

    staging_removed: int
    partials_removed: int
    ready: int
    corrupt: int
    dangling_aliases: tuple[str, ...]


@dataclasses.dataclass
class _Entry:
    manifest: Manifest | None
    state: str
    error: str
    size: int
    created_at: float


Listener = Callable[[Change], None]


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Store:
    """The one writer of a store folder. Thread-safe; listeners are called under the lock, in order."""

    def __init__(
        self,
        layout: StoreLayout,
        *,
        budget_bytes: int = 0,
        min_free_bytes: int = 0,
        verify_mode: str = "full",
        partial_max_age_s: float = 0.0,
    ):
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.min_free_bytes = min_free_bytes
        self.verify_mode = verify_mode
        self.partial_max_age_s = partial_max_age_s
        self.instance_id = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._entries: dict[VariantKey, _Entry] = {}
        self._aliases: dict[str, AliasRecord] = {}
        self._pins: set[str] = set()
        self._last_used: dict[VariantKey, float] = {}
        self._hub_refs: dict[str, str] = {}
        self._busy: dict[VariantKey, int] = {}
        self._reserved = 0
        self._sequence = 0
        self._listeners: list[Listener] = []
        self._lock_fd: int | None = None

    # ---- start-up -------------------------------------------------------------------------

    def open(self) -> ReconcileReport:
        """Locks the store against a second sidecar and reconciles it with what is on disk."""
        self.layout.create()
        fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(f"another model manager holds the store {self.layout.root}") from None
        self._lock_fd = fd
        return self.reconcile()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def reconcile(self) -> ReconcileReport:
        """Removes staging leftovers and stale partial downloads, re-reads and re-verifies every variant."""
        with self._lock:
            staging_removed = 0
            for entry in self.layout.staging.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    _rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
                staging_removed += 1
            partials_removed = self._clean_downloads()
            for leftover in self.layout.root.glob(".*.tmp-*"):
                leftover.unlink(missing_ok=True)
            self._entries = self._scan()
            self._load_state()
            self._load_aliases()
            dangling = tuple(a for a, rec in self._aliases.items() if rec.key not in self._entries)
            for alias in dangling:
                log.warning("alias points at a missing variant", extra={"alias": alias})
            ready = sum(1 for e in self._entries.values() if e.state == READY)
            report = ReconcileReport(staging_removed, partials_removed, ready, len(self._entries) - ready, dangling)
            log.info("store reconciled", extra=dataclasses.asdict(report) | {"store": str(self.layout.root)})
            return report

    def _clean_downloads(self) -> int:
        removed = 0
        now = time.time()
        for entry in self.layout.downloads.iterdir():
            stale = self.partial_max_age_s > 0 and now - entry.stat().st_mtime > self.partial_max_age_s
            if not entry.name.endswith(".part") or not entry.is_file() or stale:
                if entry.is_dir() and not entry.is_symlink():
                    _rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def _scan(self) -> dict[VariantKey, _Entry]:
        found: dict[VariantKey, _Entry] = {}
        variants = {v.value for v in Variant}
        for name_dir in sorted(self.layout.models.iterdir()):
            if not name_dir.is_dir() or not is_safe_component(name_dir.name):
                log.warning("ignoring foreign entry in the store", extra={"path": str(name_dir)})
                continue
            for rev_dir in sorted(name_dir.iterdir()):
                if not rev_dir.is_dir() or not is_safe_component(rev_dir.name):
                    log.warning("ignoring foreign entry in the store", extra={"path": str(rev_dir)})
                    continue
                for var_dir in sorted(rev_dir.iterdir()):
                    if var_dir.name not in variants or not var_dir.is_dir():
                        log.warning("ignoring foreign entry in the store", extra={"path": str(var_dir)})
                        continue
                    key = VariantKey(name_dir.name, rev_dir.name, var_dir.name)
                    found[key] = self._check(key, var_dir)
                if not any(rev_dir.iterdir()):
                    rev_dir.rmdir()
            if not any(name_dir.iterdir()):
                name_dir.rmdir()
        return found

    def _check(self, key: VariantKey, folder: Path) -> _Entry:
        try:
            manifest = read_manifest(folder)
        except ValueError as exc:
            log.error("stored variant has no valid manifest", extra={"variant": key.label(), "error": str(exc)})
            return _Entry(None, CORRUPT, f"manifest: {exc}", _du(folder), folder.stat().st_mtime)
        if (manifest.name, manifest.revision, manifest.variant) != (key.name, key.revision, key.variant):
            error = "manifest names a different model, revision or variant than its folder"
            return _Entry(manifest, CORRUPT, error, manifest.size_bytes, manifest.created_at)
        problems: list[str] = []
        if self.verify_mode != "off":
            problems = verify(folder, manifest, full=self.verify_mode == "full")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.error("stored variant failed verification", extra={"variant": key.label(), "problems": problems})
            return _Entry(manifest, CORRUPT, problems[0] + more, manifest.size_bytes, manifest.created_at)
        return _Entry(manifest, READY, "", manifest.size_bytes, manifest.created_at)

    def _load_state(self) -> None:
        data = _read_json(self.layout.state)
        self._pins = {p for p in data.get("pins", []) if isinstance(p, str) and is_safe_component(p)}
        self._last_used = {}
        for label, when in dict(data.get("last_used", {})).items():
            parts = str(label).split("/")
            if len(parts) == 3:
                key = VariantKey(*parts)
                if key in self._entries:
                    self._last_used[key] = float(when)
        self._hub_refs = {str(k): str(v) for k, v in dict(data.get("hub_refs", {})).items()}

    def _save_state(self) -> None:
        write_json_atomic(
            self.layout.state,
            {
                "pins": sorted(self._pins),
                "last_used": {f"{k.name}/{k.revision}/{k.variant}": t for k, t in sorted(self._last_used.items())},
                "hub_refs": self._hub_refs,
            },
        )

    def _load_aliases(self) -> None:
        self._aliases = {}
        for alias, target in _read_json(self.layout.aliases).items():
            try:
                record = AliasRecord(
                    alias, str(target["model"]), str(target["revision"]), str(target["variant"]),
                    float(target.get("updated_at", 0.0)),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring malformed alias", extra={"alias": alias})
                continue
            if all(is_safe_component(p) for p in (alias, record.model, record.revision, record.variant)):
                self._aliases[alias] = record

    def _save_aliases(self) -> None:
        write_json_atomic(
            self.layout.aliases,
            {
                a: {"model": r.model, "revision": r.revision, "variant": r.variant, "updated_at": r.updated_at}
                for a, r in sorted(self._aliases.items())
            },
        )

    # ---- reading --------------------------------------------------------------------------

    def _view(self, key: VariantKey) -> StoredVariant:
        entry = self._entries[key]
        return StoredVariant(
            key=key,
            path=self.layout.variant_dir(key.name, key.revision, key.variant),
            manifest=entry.manifest,
            state=entry.state,
            error=entry.error,
            size_bytes=entry.size,
            created_at=entry.created_at,
            last_used=self._last_used.get(key, entry.created_at),
            pinned=key.name in self._pins,
            aliases=tuple(sorted(a for a, r in self._aliases.items() if r.key == key)),
        )

    def variants(self, name: str = "") -> list[StoredVariant]:
        """Stored variants (of `name`, or all), by name, newest revision first, then variant preference."""
        with self._lock:
            views = [self._view(k) for k in self._entries if not name or k.name == name]
        return sorted(views, key=lambda v: (v.key.name, -v.created_at, Variant(v.key.variant).rank))

    def get(self, key: VariantKey) -> StoredVariant | None:
        with self._lock:
            return self._view(key) if key in self._entries else None

    def aliases(self) -> list[tuple[AliasRecord, StoredVariant | None]]:
        """Every alias with its target (None when the target is missing)."""
        with self._lock:
            return [(r, self.get(r.key)) for _, r in sorted(self._aliases.items())]

    def has_name(self, name: str) -> bool:
        with self._lock:
            return any(k.name == name for k in self._entries)

    def is_alias(self, name: str) -> bool:
        with self._lock:
            return name in self._aliases

    def sources(self, name: str) -> set[tuple[str, str]]:
        """(kind, repo_id) of the name's variants, for the one-source-per-name rule (derived ones excluded)."""
        with self._lock:
            return {
                (e.manifest.source.kind, e.manifest.source.repo_id)
                for k, e in self._entries.items()
                if k.name == name and e.manifest is not None and e.manifest.source.kind != "derived"
            }

    def newest_revision(self, name: str) -> str:
        """The revision of the most recently published variant of `name`; raises NotFound."""
        views = self.variants(name)
        if not views:
            raise errors.NotFound(f"model {name!r} is not in the store")
        return max(views, key=lambda v: v.created_at).key.revision

    def resolve(self, name: str, revision: str = "", variant: str = "") -> StoredVariant:
        """A READY variant by name, revision (default newest) and variant (default by preference); raises NotFound."""
        revision = revision or self.newest_revision(name)
        candidates = [v for v in self.variants(name) if v.key.revision == revision or _short(revision, v.key)]
        if not candidates:
            raise errors.NotFound(f"model {name!r} has no revision {revision!r} in the store")
        if variant:
            candidates = [v for v in candidates if v.key.variant == variant]
            if not candidates:
                raise errors.NotFound(f"model {name!r} revision {revision[:12]} has no {variant} variant")
        ready = [v for v in candidates if v.state == READY]
        if not ready:
            raise errors.FailedPrecondition(
                f"{candidates[0].key.label()} is corrupt ({candidates[0].error}); pull or import it again"
            )
        return min(ready, key=lambda v: Variant(v.key.variant).rank)

    def find_hub(self, repo_id: str, revision: str) -> list[StoredVariant]:
        """READY variants pulled from `repo_id` at `revision` (a commit, a commit prefix or a ref seen before)."""
        with self._lock:
            commit = self._hub_refs.get(f"{repo_id}@{revision}", "")
            out = []
            for key, entry in self._entries.items():
                m = entry.manifest
                if entry.state != READY or m is None or m.source.repo_id != repo_id:
                    continue
                c = m.source.commit
                if c in (revision, commit) or m.source.requested_revision == revision or _short(revision, key):
                    out.append(self._view(key))
        return sorted(out, key=lambda v: -v.created_at)

    def usage(self) -> Usage:
        with self._lock:
            used = sum(e.size for e in self._entries.values())
            protected = sum(e.size for k, e in self._entries.items() if self._protected(k))
        partial = sum(p.stat().st_size for p in self.layout.downloads.glob("*.part"))
        return Usage(
            self.layout.root, used, self.budget_bytes, protected, partial, shutil.disk_usage(self.layout.root).free
        )

    # ---- events ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Snapshot:
        """Adds a listener and returns the snapshot it starts from (no change falls between the two)."""
        with self._lock:
            self._listeners.append(listener)
            return self.snapshot()

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self._sequence, tuple(self.variants()), tuple(self.aliases()), self.instance_id)

    def _emit(self, event: StoreEvent) -> None:
        self._sequence += 1
        change = Change(self._sequence, time.time(), event)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("store listener failed")

    # ---- writing --------------------------------------------------------------------------

    def publish(self, staging: Path, manifest: Manifest) -> StoredVariant:
        """Writes the manifest, verifies every file, and renames the staging folder into place atomically."""
        (staging / MANIFEST).write_text(manifest.to_json())
        problems = verify(staging, manifest, full=True)
        if problems:
            raise errors.ChecksumMismatch("verification before publishing failed: " + "; ".join(problems[:3]))
        fsync_tree(staging)
        key = VariantKey(manifest.name, manifest.revision, manifest.variant)
        target = self.layout.variant_dir(*dataclasses.astuple(key))
        trash: Path | None = None
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None and existing.state == READY:
                raise errors.AlreadyExists(f"{key.label()} is already in the store")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                trash = self.layout.trash_path()
                os.rename(target, trash)
            os.rename(staging, target)
            fsync_dir(target.parent)
            self._entries[key] = _Entry(manifest, READY, "", manifest.size_bytes, manifest.created_at)
            self._last_used[key] = time.time()
            self._save_state()
            view = self._view(key)
            log.info("published", extra={"variant": key.label(), "bytes": manifest.size_bytes})
            self._emit(Published(view))
        if trash is not None:
            _rmtree(trash)
        return view

    def remove(self, name: str, revision: str = "", variant: str = "") -> list[StoredVariant]:
        """Removes matching variants; refuses variants an alias points at or a running operation uses."""
        with self._lock:
            keys = [
                k
                for k in self._entries
                if k.name == name and (not revision or k.revision == revision or _short(revision, k))
                and (not variant or k.variant == variant)
            ]  # fmt: skip
            if not keys:
                what = " ".join(p for p in (name, revision and f"revision {revision}", variant) if p)
                raise errors.NotFound(f"{what} is not in the store")
            for key in keys:
                aliased = sorted(a for a, r in self._aliases.items() if r.key == key)
                if aliased:
                    raise errors.FailedPrecondition(
                        f"alias {aliased[0]!r} points at {key.label()}; move or delete the alias first"
                    )
                if self._busy.get(key):
                    raise errors.FailedPrecondition(f"{key.label()} is in use by a running operation")
            removed = [self._drop(k, "deleted") for k in sorted(keys)]
            self._save_state()
        return removed

    def _drop(self, key: VariantKey, reason: str) -> StoredVariant:
        view = self._view(key)
        trash = self.layout.trash_path()
        os.rename(view.path, trash)
        fsync_dir(view.path.parent)
        del self._entries[key]
        self._last_used.pop(key, None)
        for parent in (view.path.parent, view.path.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()
        log.info("removed", extra={"variant": key.label(), "reason": reason, "bytes": view.size_bytes})
        self._emit(Removed(view, reason))
        _rmtree(trash)
        return view

    def set_alias(self, alias: str, target: StoredVariant) -> tuple[AliasRecord, AliasRecord | None, StoredVariant]:
        """Points `alias` at a READY variant; writes aliases.json atomically and emits AliasSet."""
        with self._lock:
            if self.has_name(alias):
                raise errors.FailedPrecondition(f"{alias!r} is a model name; an alias must not hide a model")
            current = self.get(target.key)
            if current is None:
                raise errors.NotFound(f"{target.key.label()} is no longer in the store")
            if current.state != READY:
                raise errors.FailedPrecondition(f"{target.key.label()} is corrupt ({current.error})")
            previous = self._aliases.get(alias)
            now = time.time()
            k = target.key
            record = AliasRecord(alias, k.name, k.revision, k.variant, now)
            self._aliases[alias] = record
            self._save_aliases()
            if previous is not None and previous.key != record.key and previous.key in self._entries:
                self._last_used[previous.key] = now
            self._last_used[target.key] = now
            self._save_state()
            current = self._view(target.key)
            log.info("alias set", extra={"alias": alias, "target": target.key.label()})
            self._emit(AliasSet(record, current, previous))
            return record, previous, current

    def delete_alias(self, alias: str) -> AliasRecord:
        with self._lock:
            record = self._aliases.pop(alias, None)
            if record is None:
                raise errors.NotFound(f"alias {alias!r} does not exist")
            self._save_aliases()
            if record.key in self._entries:
                self._last_used[record.key] = time.time()
                self._save_state()
            log.info("alias removed", extra={"alias": alias})
            self._emit(AliasRemoved(record))
            return record

    def pin(self, name: str, pinned: bool) -> list[StoredVariant]:
        with self._lock:
            if not self.has_name(name):
                raise errors.NotFound(f"model {name!r} is not in the store")
            (self._pins.add if pinned else self._pins.discard)(name)
            self._save_state()
            return self.variants(name)

    def touch(self, key: VariantKey) -> None:
        """Marks a variant used now (for least-recently-used eviction)."""
        with self._lock:
            if key not in self._entries:
                raise errors.NotFound(f"{key.label()} is not in the store")
            self._last_used[key] = time.time()
            self._save_state()

    def record_hub_ref(self, repo_id: str, ref: str, commit: str) -> None:
        """Remembers what a branch or tag resolved to, for offline pulls by that name."""
        with self._lock:
            self._hub_refs[f"{repo_id}@{ref}"] = commit
            self._save_state()

    @contextlib.contextmanager
    def in_use(self, key: VariantKey) -> Iterator[None]:
        """Protects a variant from eviction and deletion while an operation reads it."""
        with self._lock:
            self._busy[key] = self._busy.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[key] -= 1
                if not self._busy[key]:
                    del self._busy[key]

    def _protected(self, key: VariantKey) -> bool:
        return key.name in self._pins or any(r.key == key for r in self._aliases.values()) or bool(self._busy.get(key))

    @contextlib.contextmanager
    def reserve(self, nbytes: int, label: str) -> Iterator[list[StoredVariant]]:
        """Makes room for `nbytes` (evicting least-recently-used unprotected variants) and holds it while open.

        Raises ResourceExhausted, having evicted nothing, when even evicting every evictable variant would not do.
        """
        with self._lock:
            evicted = self._make_room(nbytes, label)
            self._reserved += nbytes
        try:
            yield evicted
        finally:
            with self._lock:
                self._reserved -= nbytes

    def _make_room(self, nbytes: int, label: str) -> list[StoredVariant]:
        used = sum(e.size for e in self._entries.values())
        free = shutil.disk_usage(self.layout.root).free
        candidates = sorted(
            (k for k in self._entries if not self._protected(k)),
            key=lambda k: (self._entries[k].state == READY, self._last_used.get(k, self._entries[k].created_at)),
        )
        evictable = sum(self._entries[k].size for k in candidates)
        over_budget = self.budget_bytes and used + self._reserved + nbytes > self.budget_bytes
        if over_budget and used - evictable + self._reserved + nbytes > self.budget_bytes:
            raise errors.BudgetExceeded(
                f"{label} needs {_size(nbytes)} but the store's budget is {_size(self.budget_bytes)}, with "
                f"{_size(used - evictable)} held by pinned, aliased or in-use models"
                + (f" and {_size(self._reserved)} reserved by running operations" if self._reserved else "")
                + "; raise --max-store-bytes, unpin or delete models"
            )
        if free - nbytes < self.min_free_bytes and free + evictable - nbytes < self.min_free_bytes:
            raise errors.DiskFull(
                f"{label} needs {_size(nbytes)} but the store's disk has {_size(free)} free"
                f" (keeping {_size(self.min_free_bytes)} free), and evicting every evictable model frees only "
                f"{_size(evictable)}"
            )
        evicted = []
        for key in candidates:
            used = sum(e.size for e in self._entries.values())
            free = shutil.disk_usage(self.layout.root).free
            needs_budget = self.budget_bytes and used + self._reserved + nbytes > self.budget_bytes
            if not needs_budget and free - nbytes >= self.min_free_bytes:
                break
            evicted.append(self._drop(key, "evicted"))
        if evicted:
            self._save_state()
        return evicted


def _short(revision: str, key: VariantKey) -> bool:
    return len(revision) >= 7 and key.revision.startswith(revision)


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        log.error("unreadable store file; starting from empty", extra={"path": str(path), "error": str(exc)})
        return {}
    return data if isinstance(data, dict) else {}


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover
