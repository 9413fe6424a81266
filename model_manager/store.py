"""The model store: index of published variants, atomic publish and removal, integrity checks, aliases (with revert
on failure), pins, server leases, LRU eviction, events."""

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from model_manager import errors
from model_manager.capabilities import Capabilities, describe
from model_manager.layout import StoreLayout
from model_manager.manifest import fsync_dir, fsync_tree, read_manifest, write_json_atomic
from model_manager.names import Variant, is_safe_component
from sdserve_core.manifest import MANIFEST, Manifest, verify

log = logging.getLogger(__name__)

READY = "ready"
CORRUPT = "corrupt"
DEFAULT_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True, order=True)
class VariantKey:
    """Identifies one stored variant."""

    name: str
    revision: str
    variant: str

    def label(self) -> str:
        return f"{self.name}@{self.revision[:12]}:{self.variant}"


class CorruptVariant(errors.FailedPrecondition):
    """The variant asked for is CORRUPT (FAILED_PRECONDITION); `key` names it."""

    def __init__(self, message: str, key: VariantKey):
        super().__init__(message)
        self.key = key


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
    # Servers holding an unexpired lease on it (it is loaded or aliased there), and when the last lease ends.
    lease_holders: int = 0
    lease_expires_at: float = 0.0
    # The model family and tasks of its folder (model_manager.capabilities); empty when unreadable.
    family: str = ""
    tasks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AliasFailure:
    """A target an alias was pointed at that could not serve: refused by verification, found corrupt later, or
    reported by a server that could not load it. `reverted`: the alias went back to its previous target."""

    target: VariantKey
    reason: str
    reporter: str
    at: float
    reverted: bool


@dataclasses.dataclass(frozen=True)
class AliasRecord:
    """An alias, the variant it points at, the target it goes back to if that one fails, and the last failure."""

    name: str
    model: str
    revision: str
    variant: str
    updated_at: float
    revert_to: VariantKey | None = None
    failure: AliasFailure | None = None
    # A canary alias's weighted targets, the first being model/revision/variant; empty for a plain alias.
    split: tuple[tuple[VariantKey, int], ...] = ()

    @property
    def key(self) -> VariantKey:
        return VariantKey(self.model, self.revision, self.variant)

    def targets(self) -> tuple[VariantKey, ...]:
        """Every variant the alias serves: its canary targets, or its one target."""
        return tuple(k for k, _ in self.split) or (self.key,)


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
    """An alias was set; `target` is the variant it now points at. `reverted`: the sidecar moved it back because
    its target failed (`reason` says why)."""

    alias: AliasRecord
    target: StoredVariant
    previous: AliasRecord | None
    reverted: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class AliasRemoved:
    """An alias was removed."""

    alias: AliasRecord


@dataclasses.dataclass(frozen=True)
class Corrupted:
    """A READY variant failed verification after it was published; it is CORRUPT now and must not be served."""

    variant: StoredVariant
    problems: tuple[str, ...]


StoreEvent = Published | Removed | AliasSet | AliasRemoved | Corrupted


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
class ScrubReport:
    """What one scrub read and found (`corrupt`: variants it marked CORRUPT)."""

    checked: int
    corrupt: int
    bytes: int
    seconds: float


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
    caps: Capabilities = dataclasses.field(default_factory=Capabilities)


@dataclasses.dataclass(frozen=True)
class _Lease:
    keys: frozenset[VariantKey]
    seconds: float
    expires: float  # on the store's clock


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
        clock: Callable[[], float] = time.monotonic,
        read_only: bool = False,
    ):
        self.layout = layout
        # A shared store populated once (--read-only-store): nothing under it is written, created or removed.
        self.read_only = read_only
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
        # Server leases by holder; `clock` (monotonic seconds) times them.
        self.clock = clock
        self._leases: dict[str, _Lease] = {}

    # ---- start-up -------------------------------------------------------------------------

    def open(self) -> ReconcileReport:
        """Locks the store against a second sidecar and reconciles it with what is on disk."""
        self.layout.create(self.read_only)
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
            staging_removed = partials_removed = 0
            for entry in self._leftovers():
                if entry.is_dir() and not entry.is_symlink():
                    _rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
                staging_removed += 1
            if not self.read_only:
                partials_removed = self._clean_downloads()
                for leftover in self.layout.root.glob(".*.tmp-*"):
                    leftover.unlink(missing_ok=True)
            self._entries = self._scan()
            self._load_state()
            self._load_aliases()
            missing = [a for a, rec in self._aliases.items() if any(k not in self._entries for k in rec.targets())]
            dangling = tuple(missing)
            for alias in dangling:
                log.warning("alias points at a missing variant", extra={"alias": alias})
            for alias in sorted(self._aliases):
                self._fail_corrupt_targets(alias)
            ready = sum(1 for e in self._entries.values() if e.state == READY)
            report = ReconcileReport(staging_removed, partials_removed, ready, len(self._entries) - ready, dangling)
            log.info("store reconciled", extra=dataclasses.asdict(report) | {"store": str(self.layout.root)})
            return report

    def _leftovers(self) -> list[Path]:
        """What an interrupted operation left in staging/ (nothing to clean up in a read-only store)."""
        if self.read_only or not self.layout.staging.is_dir():
            return []
        return list(self.layout.staging.iterdir())

    def check_writable(self, what: str) -> None:
        """FAILED_PRECONDITION when the store is read-only: `what` (a pull, an import...) would write to it."""
        if self.read_only:
            raise errors.FailedPrecondition(
                f"the store {self.layout.root} is read-only (--read-only-store): {what} is refused; populate the "
                "shared store with a sidecar that can write to it"
            )

    def _fail_corrupt_targets(self, alias: str) -> None:
        """At start: an alias on a variant found corrupt goes back to its previous target (a canary target leaves
        the split), as it would have had the sidecar been running when the files changed. Under the lock."""
        for key in self._aliases[alias].targets():
            rec = self._aliases.get(alias)
            target = self._entries.get(key)
            if rec is None or key not in rec.targets() or target is None or target.state != CORRUPT:
                continue
            known = rec.failure is not None and rec.failure.target == key and not rec.failure.reverted
            if not known:
                self._fail_alias(alias, key, f"{key.label()} is corrupt: {target.error}", "sidecar")

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
        return {key: self._check(key, folder) for key, folder in self._listing()}

    def _listing(self) -> list[tuple[VariantKey, Path]]:
        """Every variant folder under models/ (empty folders are removed, except in a read-only store)."""
        found: list[tuple[VariantKey, Path]] = []
        variants = {v.value for v in Variant}
        if not self.layout.models.is_dir():
            return found
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
                    found.append((VariantKey(name_dir.name, rev_dir.name, var_dir.name), var_dir))
                if not self.read_only and not any(rev_dir.iterdir()):
                    rev_dir.rmdir()
            if not self.read_only and not any(name_dir.iterdir()):
                name_dir.rmdir()
        return found

    def rescan(self) -> tuple[int, int]:
        """A read-only store: takes in the variants published into it since the last scan (by whatever populates the
        shared volume) and forgets those gone from it, emitting Published and Removed; returns (added, removed). A
        writable store changes only through this sidecar: (0, 0)."""
        if not self.read_only:
            return 0, 0
        listing = dict(self._listing())
        with self._lock:
            new = {k: f for k, f in listing.items() if k not in self._entries}
            gone = [k for k in self._entries if k not in listing]
        checked = {k: self._check(k, f) for k, f in new.items()}  # hashing outside the lock
        with self._lock:
            for key, entry in checked.items():
                self._entries[key] = entry
                log.info("found in the read-only store", extra={"variant": key.label(), "state": entry.state})
                self._emit(Published(self._view(key)))
            for key in gone:
                view = self._view(key)
                del self._entries[key]
                log.warning("gone from the read-only store", extra={"variant": key.label()})
                self._emit(Removed(view, "deleted"))
        return len(checked), len(gone)

    def _check(self, key: VariantKey, folder: Path) -> _Entry:
        caps = describe(folder)
        try:
            manifest = read_manifest(folder)
        except ValueError as exc:
            log.error("stored variant has no valid manifest", extra={"variant": key.label(), "error": str(exc)})
            return _Entry(None, CORRUPT, f"manifest: {exc}", _du(folder), folder.stat().st_mtime, caps)
        if (manifest.name, manifest.revision, manifest.variant) != (key.name, key.revision, key.variant):
            error = "manifest names a different model, revision or variant than its folder"
            return _Entry(manifest, CORRUPT, error, manifest.size_bytes, manifest.created_at, caps)
        problems: list[str] = []
        if self.verify_mode != "off":
            problems = verify(folder, manifest, full=self.verify_mode == "full")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.error("stored variant failed verification", extra={"variant": key.label(), "problems": problems})
            return _Entry(manifest, CORRUPT, problems[0] + more, manifest.size_bytes, manifest.created_at, caps)
        return _Entry(manifest, READY, "", manifest.size_bytes, manifest.created_at, caps)

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
        # Leases survive a sidecar restart with a fresh term, so eviction spares what servers hold until they
        # subscribe again and renew (or, if they died meanwhile, until the term ends).
        self._leases = {}
        for holder, lease in dict(data.get("leases", {})).items():
            try:
                keys = frozenset(VariantKey(*str(k).split("/")) for k in lease["variants"])
                seconds = min(max(float(lease["seconds"]), 1.0), MAX_LEASE_SECONDS)
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring a malformed lease", extra={"holder": str(holder)})
                continue
            self._leases[str(holder)] = _Lease(keys, seconds, self.clock() + seconds)

    def _save_state(self) -> None:
        write_json_atomic(
            self.layout.state,
            {
                "pins": sorted(self._pins),
                "last_used": {f"{k.name}/{k.revision}/{k.variant}": t for k, t in sorted(self._last_used.items())},
                "hub_refs": self._hub_refs,
                "leases": {
                    holder: {
                        "variants": sorted(f"{k.name}/{k.revision}/{k.variant}" for k in lease.keys),
                        "seconds": lease.seconds,
                    }
                    for holder, lease in sorted(self._leases.items())
                },
            },
        )

    def _load_aliases(self) -> None:
        self._aliases = {}
        for alias, target in _read_json(self.layout.aliases).items():
            try:
                record = AliasRecord(
                    alias, str(target["model"]), str(target["revision"]), str(target["variant"]),
                    float(target.get("updated_at", 0.0)),
                    _key_from_json(target.get("revert_to")), _failure_from_json(target.get("last_failure")),
                    _split_from_json(target.get("split")),
                )  # fmt: skip
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring malformed alias", extra={"alias": alias})
                continue
            if all(is_safe_component(p) for p in (alias, record.model, record.revision, record.variant)) and (
                not record.split or record.split[0][0] == record.key
            ):
                self._aliases[alias] = record

    def _save_aliases(self) -> None:
        write_json_atomic(self.layout.aliases, {a: _alias_to_json(r) for a, r in sorted(self._aliases.items())})

    # ---- reading --------------------------------------------------------------------------

    def _view(self, key: VariantKey) -> StoredVariant:
        entry = self._entries[key]
        now = self.clock()
        leases = [lease.expires for lease in self._leases.values() if key in lease.keys and lease.expires > now]
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
            aliases=tuple(sorted(a for a, r in self._aliases.items() if key in r.targets())),
            lease_holders=len(leases),
            lease_expires_at=time.time() + max(leases) - now if leases else 0.0,
            family=entry.caps.family,
            tasks=entry.caps.tasks,
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
            raise CorruptVariant(
                f"{candidates[0].key.label()} is corrupt ({candidates[0].error}); pull or import it again",
                candidates[0].key,
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
        self.check_writable("publishing")
        (staging / MANIFEST).write_text(manifest.to_json())
        problems = verify(staging, manifest, full=True)
        if problems:
            raise errors.ChecksumMismatch("verification before publishing failed: " + "; ".join(problems[:3]))
        fsync_tree(staging)
        # Read before taking the lock: the first description imports torch (model_manager.capabilities).
        caps = describe(staging)
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
            self._entries[key] = _Entry(manifest, READY, "", manifest.size_bytes, manifest.created_at, caps)
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
        self.check_writable("removing a model")
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
                aliased = sorted(a for a, r in self._aliases.items() if key in r.targets())
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

    def set_alias(
        self, alias: str, target: StoredVariant, split: Sequence[tuple[StoredVariant, int]] = ()
    ) -> tuple[AliasRecord, AliasRecord | None, StoredVariant]:
        """Points `alias` at a READY variant, or with `split` at two or more weighted READY variants (a canary
        alias; the first is `target`); writes aliases.json atomically and emits AliasSet."""
        with self._lock:
            if self.has_name(alias):
                raise errors.FailedPrecondition(f"{alias!r} is a model name; an alias must not hide a model")
            targets = [v for v, _ in split] or [target]
            for t in targets:
                current = self.get(t.key)
                if current is None:
                    raise errors.NotFound(f"{t.key.label()} is no longer in the store")
                if current.state != READY:
                    raise errors.FailedPrecondition(f"{t.key.label()} is corrupt ({current.error})")
            previous = self._aliases.get(alias)
            now = time.time()
            k = targets[0].key
            # Where the alias goes back to if this target fails: the target it leaves (kept when re-set in place).
            revert_to = None
            if previous is not None:
                revert_to = previous.key if previous.key != k else previous.revert_to
            weights = tuple((v.key, w) for v, w in split)
            record = AliasRecord(alias, k.name, k.revision, k.variant, now, revert_to, None, weights)
            self._aliases[alias] = record
            self._save_aliases()
            left = [old for old in previous.targets() if old not in record.targets()] if previous is not None else []
            for key in [*left, *record.targets()]:
                if key in self._entries:
                    self._last_used[key] = now
            self._save_state()
            current = self._view(k)
            log.info("alias set", extra={"alias": alias, "target": " | ".join(_weighted_labels(record))})
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
        return (
            key.name in self._pins
            or any(key in r.targets() for r in self._aliases.values())
            or bool(self._busy.get(key))
            or self._leased(key)
        )

    # ---- integrity ------------------------------------------------------------------------

    def check_variant(self, key: VariantKey, *, rehash: bool = False, reporter: str = "sidecar") -> list[str]:
        """Verifies a variant's files against its manifest (size and sha256; digests cached by stat unless `rehash`).

        A READY variant that fails is marked CORRUPT (a Corrupted event) and every alias pointing at it goes back
        to its previous target (see _fail_alias). Returns the problems (a CORRUPT variant's recorded error); raises
        NotFound. Hashing runs outside the lock."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise errors.NotFound(f"{key.label()} is not in the store")
            if entry.state != READY:
                return [entry.error]
            manifest = entry.manifest
            folder = self.layout.variant_dir(key.name, key.revision, key.variant)
        problems = (
            verify(folder, manifest, full=True, rehash=rehash) if manifest is not None else [f"{MANIFEST}: missing"]
        )
        if problems:
            with self._lock:
                if self._entries.get(key) is entry:  # not removed or replaced meanwhile
                    self._mark_corrupt(key, problems, reporter)
        return problems

    def _mark_corrupt(self, key: VariantKey, problems: list[str], reporter: str) -> bool:
        entry = self._entries.get(key)
        if entry is None or entry.state != READY:
            return False
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        entry.state = CORRUPT
        entry.error = problems[0] + more
        log.error(
            "stored variant failed verification; it is corrupt now",
            extra={"variant": key.label(), "problems": problems, "found_by": reporter},
        )
        self._emit(Corrupted(self._view(key), tuple(problems)))
        for alias, record in sorted(self._aliases.items()):
            if key in record.targets():
                self._fail_alias(alias, key, f"{key.label()} is corrupt: {entry.error}", reporter)
        return True

    def _fail_alias(self, alias: str, target: VariantKey, reason: str, reporter: str) -> bool:
        """Records that `alias`'s target failed; moves the alias back to its previous target when that is stored,
        READY and verifies (emitting AliasSet with reverted=True). Returns whether it moved. A canary alias drops the
        failed target from its split instead, and its other targets keep serving. Under the lock."""
        record = self._aliases[alias]
        if len(record.split) > 1 and target in record.targets():
            return self._leave_split(alias, target, reason, reporter)
        back = record.revert_to
        usable = back is not None and back != target and back in self._entries and self._entries[back].state == READY
        if back is not None and usable:
            manifest = self._entries[back].manifest
            folder = self.layout.variant_dir(back.name, back.revision, back.variant)
            problems = verify(folder, manifest, full=True) if manifest is not None else [f"{MANIFEST}: missing"]
            if problems:
                self._mark_corrupt(back, problems, reporter)
                usable = False
        now = time.time()
        failure = AliasFailure(target, reason, reporter, now, usable)
        if back is not None and usable:
            moved = AliasRecord(alias, back.name, back.revision, back.variant, now, None, failure)
            self._aliases[alias] = moved
            self._save_aliases()
            self._last_used[back] = now
            self._save_state()
            log.warning(
                "alias target failed; the alias went back to its previous target",
                extra={"alias": alias, "failed": target.label(), "target": back.label(), "reason": reason},
            )
            self._emit(AliasSet(moved, self._view(back), record, reverted=True, reason=reason))
            return True
        self._aliases[alias] = dataclasses.replace(record, failure=failure)
        self._save_aliases()
        log.warning(
            "alias target failed and there is no previous target to go back to",
            extra={"alias": alias, "failed": target.label(), "reason": reason},
        )
        return False

    def _leave_split(self, alias: str, target: VariantKey, reason: str, reporter: str) -> bool:
        """A canary target failed: the alias keeps its other targets and their weights (one left: a plain alias on
        it) and emits AliasSet with reverted=True. Under the lock."""
        record = self._aliases[alias]
        now = time.time()
        rest = tuple((k, w) for k, w in record.split if k != target)
        first = rest[0][0]
        failure = AliasFailure(target, reason, reporter, now, True)
        moved = AliasRecord(
            alias,
            first.name,
            first.revision,
            first.variant,
            now,
            record.revert_to,
            failure,
            rest if len(rest) > 1 else (),
        )
        self._aliases[alias] = moved
        self._save_aliases()
        log.warning(
            "canary target failed; it left the alias's split and the other targets serve",
            extra={"alias": alias, "failed": target.label(), "target": " | ".join(_weighted_labels(moved))},
        )
        self._emit(AliasSet(moved, self._view(first), record, reverted=True, reason=reason))
        return True

    def report_failure(self, alias: str, target: VariantKey, reason: str) -> tuple[AliasRecord, bool]:
        """A server could not serve `target` under `alias`: re-verifies the target's files (a mismatch marks it
        CORRUPT), and if the alias still points at it, moves it back to its previous target (or records the
        failure when there is none). Returns the alias after the report and whether this report moved it."""
        started = time.time()
        with self._lock:
            if alias not in self._aliases:
                raise errors.NotFound(f"alias {alias!r} does not exist")
            present = target in self._entries
        if present:
            # From the cache where files are unchanged: a report must answer quickly, and the scrub re-reads.
            self.check_variant(target, reporter="server")
        with self._lock:
            record = self._aliases.get(alias)
            if record is None:
                raise errors.NotFound(f"alias {alias!r} does not exist")
            f = record.failure
            handled = f is not None and f.target == target and f.at >= started  # by the check just made
            if target in record.targets() and not handled:
                moved = self._fail_alias(alias, target, f"a server could not load it: {reason}", "server")
                return self._aliases[alias], moved
            return record, handled and f is not None and f.reverted

    def record_refusal(self, alias: str, target: VariantKey, reason: str) -> None:
        """Records on an existing alias that SetAlias refused to point it at `target` (the alias did not move)."""
        with self._lock:
            record = self._aliases.get(alias)
            if record is None:
                return
            failure = AliasFailure(target, reason, "sidecar", time.time(), False)
            self._aliases[alias] = dataclasses.replace(record, failure=failure)
            self._save_aliases()

    def scrub(self, stop: threading.Event | None = None) -> ScrubReport:
        """Reads every READY variant's files again (bypassing the hash cache) and marks mismatches CORRUPT."""
        start = time.monotonic()
        with self._lock:
            keys = sorted(k for k, e in self._entries.items() if e.state == READY)
        checked = corrupt = nbytes = 0
        for key in keys:
            if stop is not None and stop.is_set():
                break
            with self._lock:
                entry = self._entries.get(key)
                size = entry.size if entry is not None and entry.state == READY else -1
            if size < 0:
                continue
            try:
                problems = self.check_variant(key, rehash=True, reporter="scrub")
            except errors.NotFound:
                continue
            checked += 1
            nbytes += size
            corrupt += bool(problems)
        return ScrubReport(checked, corrupt, nbytes, time.monotonic() - start)

    # ---- leases ---------------------------------------------------------------------------

    def renew_leases(
        self, holder: str, keys: Iterable[VariantKey], seconds: float = DEFAULT_LEASE_SECONDS
    ) -> tuple[list[VariantKey], float]:
        """Replaces `holder`'s leases with `keys` (what that server has loaded or aliased now) for `seconds`;
        leased variants are not evicted. An empty `keys` releases them. Returns (keys not in the store, when the
        leases end as a Unix time)."""
        with self._lock:
            self._expire_leases()
            wanted = frozenset(keys)
            unknown = sorted(k for k in wanted if k not in self._entries)
            known = wanted - set(unknown)
            old = self._leases.get(holder)
            if known:
                self._leases[holder] = _Lease(known, seconds, self.clock() + seconds)
            else:
                self._leases.pop(holder, None)
            if old is None or old.keys != known or old.seconds != seconds:
                log.info(
                    "leases renewed",
                    extra={"holder": holder, "variants": sorted(k.label() for k in known), "seconds": seconds},
                )
                self._save_state()
            return unknown, time.time() + seconds

    def lease_counts(self) -> tuple[int, int]:
        """(servers holding unexpired leases, stored variants leased by any of them)."""
        with self._lock:
            now = self.clock()
            live = [lease for lease in self._leases.values() if lease.expires > now]
            return len(live), len({k for lease in live for k in lease.keys if k in self._entries})

    def _leased(self, key: VariantKey) -> bool:
        now = self.clock()
        return any(key in lease.keys and lease.expires > now for lease in self._leases.values())

    def _expire_leases(self) -> None:
        now = self.clock()
        expired = sorted(h for h, lease in self._leases.items() if lease.expires <= now)
        for holder in expired:
            log.warning("lease expired: its server stopped renewing", extra={"holder": holder})
            del self._leases[holder]
        if expired:
            self._save_state()

    @contextlib.contextmanager
    def reserve(self, nbytes: int, label: str) -> Iterator[list[StoredVariant]]:
        """Makes room for `nbytes` (evicting least-recently-used unprotected variants) and holds it while open.

        Raises ResourceExhausted, having evicted nothing, when even evicting every evictable variant would not do.
        """
        self.check_writable(label)
        with self._lock:
            evicted = self._make_room(nbytes, label)
            self._reserved += nbytes
        try:
            yield evicted
        finally:
            with self._lock:
                self._reserved -= nbytes

    def _make_room(self, nbytes: int, label: str) -> list[StoredVariant]:
        self._expire_leases()
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
                f"{_size(used - evictable)} held by pinned, aliased or in-use models (loaded by a server counts)"
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


def _key_to_json(key: VariantKey) -> dict[str, str]:
    return {"model": key.name, "revision": key.revision, "variant": key.variant}


def _key_from_json(data: Any) -> VariantKey | None:
    if not isinstance(data, dict):
        return None
    key = VariantKey(str(data["model"]), str(data["revision"]), str(data["variant"]))
    return key if all(is_safe_component(p) for p in dataclasses.astuple(key)) else None


def _failure_from_json(data: Any) -> AliasFailure | None:
    if not isinstance(data, dict):
        return None
    target = _key_from_json(data.get("target"))
    if target is None:
        return None
    return AliasFailure(
        target, str(data["reason"]), str(data.get("reporter", "")), float(data["at"]), bool(data.get("reverted"))
    )


def _weighted_labels(r: AliasRecord) -> list[str]:
    """The alias's targets as labels, each canary target with its weight (`NAME@REV:VARIANT*WEIGHT`)."""
    return [f"{k.label()}*{w}" for k, w in r.split] or [r.key.label()]


def _split_from_json(data: Any) -> tuple[tuple[VariantKey, int], ...]:
    """A canary alias's weighted targets; () for a plain alias. Raises ValueError/KeyError/TypeError when malformed."""
    if data is None:
        return ()
    out = []
    for item in data:
        key = _key_from_json(item)
        weight = int(item["weight"])
        if key is None or weight < 1:
            raise ValueError("malformed canary target")
        out.append((key, weight))
    return tuple(out)


def _alias_to_json(r: AliasRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"model": r.model, "revision": r.revision, "variant": r.variant, "updated_at": r.updated_at}
    if r.split:
        out["split"] = [{**_key_to_json(k), "weight": w} for k, w in r.split]
    if r.revert_to is not None:
        out["revert_to"] = _key_to_json(r.revert_to)
    if r.failure is not None:
        f = r.failure
        out["last_failure"] = {
            "target": _key_to_json(f.target), "reason": f.reason, "reporter": f.reporter, "at": f.at,
            "reverted": f.reverted,
        }  # fmt: skip
    return out


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
