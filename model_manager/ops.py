"""Pull, import and variant operations: plan, reserve room, stage, verify, publish; one operation per name at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from model_manager import errors
from model_manager.errors import FieldViolation
from model_manager.hub import Hub, HubUnreachable, RemoteFile, RepoSnapshot
from model_manager.manifest import hash_folder
from model_manager.metrics import ManagerMetrics
from model_manager.names import NAME_RULE, name_problem
from model_manager.progress import Reporter
from model_manager.scrub import Scrubber
from model_manager.selection import Pick, SelectionError, select
from model_manager.settings import Settings
from model_manager.store import READY, CorruptVariant, Store, StoredVariant, VariantKey
from model_manager.weights import BadWeights, floating_dtype, is_pickle_name, looks_pickled, read_header
from sdserve_core import model_folder
from sdserve_core.manifest import Manifest, Quality, Source

if TYPE_CHECKING:
    from model_manager.quality import RenderSpec
    from model_manager.single_file import Converted

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CHUNK = 1 << 20
# Which stored variant each variant may be made from, best first.
_SOURCES = {"fp16": ("fp32",), "bf16": ("fp32",), "int8": ("fp32", "fp16", "bf16")}


@dataclasses.dataclass(frozen=True)
class PullRequest:
    """Pull `repo_id` at `revision` as `variant` under `name` (empty: the repo's name)."""

    repo_id: str
    revision: str = "main"
    variant: str = "fp32"
    name: str = ""


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """Import a local folder or single-file checkpoint."""

    path: str
    name: str = ""
    architecture: str = ""
    config_from: str = ""


@dataclasses.dataclass(frozen=True)
class VariantRequest:
    """Make `variant` of a stored revision (empty: the newest)."""

    name: str
    variant: str
    revision: str = ""
    measure_quality: bool | None = None


@dataclasses.dataclass(frozen=True)
class OperationResult:
    """The outcome of a pull, import or variant operation."""

    model: StoredVariant
    also_published: tuple[StoredVariant, ...] = ()
    already_present: bool = False
    offline: bool = False
    downloaded_bytes: int = 0
    resumed_bytes: int = 0
    evicted: tuple[StoredVariant, ...] = ()


def _key_attributes(key: VariantKey) -> dict[str, str]:
    return {"sdserve.model": key.name, "sdserve.model.revision": key.revision, "sdserve.model.variant": key.variant}


def _result_attributes(result: OperationResult) -> dict[str, Any]:
    """A finished operation's span attributes: what it stored and what it cost."""
    return {
        **_key_attributes(result.model.key),
        "sdserve.already_present": result.already_present,
        "sdserve.offline": result.offline,
        "sdserve.downloaded_bytes": result.downloaded_bytes,
        "sdserve.resumed_bytes": result.resumed_bytes,
        "sdserve.published": len(result.also_published) + (0 if result.already_present else 1),
    }


def _disk_full(exc: OSError) -> bool:
    return exc.errno in _DISK_FULL


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _strip_pipeline_extras(folder: Path) -> None:
    """The store keeps no safety checker or feature extractor; model_index.json must not ask for them."""
    path = folder / "model_index.json"
    index = _read_json(path)
    for key in ("safety_checker", "feature_extractor", "image_encoder"):
        if key in index:
            index[key] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _check_weights(folder: Path) -> None:
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            read_header(path)
        except BadWeights as exc:
            raise errors.DataLoss(f"{path.relative_to(folder)}: {exc}; nothing was published") from None


def _check_components(folder: Path, field: str, what: str) -> None:
    """The fetched files hold every component the model's own model_index.json names (SD 1.x/2.x: one text
    encoder; SDXL: two; an SDXL refiner: the second only); INVALID_ARGUMENT on `field` naming the first missing."""
    try:
        needed = model_folder.required_subfolders(folder)
    except ValueError as exc:
        raise errors.invalid_field(field, f"{what}: model_index.json is not valid JSON ({exc})") from None
    missing = [sub for sub in needed if not (folder / sub).is_dir()]
    if missing:
        raise errors.invalid_field(
            field, f"{what}: model_index.json names {', '.join(missing)}, but there are no {missing[0]}/ files"
        )


def _folder_components(folder: Path) -> tuple[str, ...]:
    """The components a local diffusers folder must have, from its model_index.json (INVALID_ARGUMENT on `path`
    when that is not valid JSON; a missing one is reported by the file selection)."""
    try:
        return model_folder.required_subfolders(folder)
    except ValueError as exc:
        raise errors.invalid_field("path", f"{folder}: model_index.json is not valid JSON ({exc})") from None


def _inspect_checkpoint(req: ImportRequest, path: Path) -> tuple[str, str]:
    """Checks a single-file checkpoint's header and architecture; returns (architecture, weights variant)."""
    from model_manager import single_file

    if req.architecture and req.architecture not in single_file.ARCHITECTURES:
        raise errors.invalid_field(
            "architecture", f"must be one of {', '.join(single_file.ARCHITECTURES)}, or empty to detect it"
        )
    try:
        read_header(path)
    except BadWeights as exc:
        raise errors.DataLoss(f"{path}: {exc}") from None
    try:
        with single_file.LazyCheckpoint(path) as ckpt:
            architecture = req.architecture or ("" if req.config_from else single_file.detect(ckpt))
            variant = single_file.weights_variant(ckpt)
    except single_file.ConversionError as exc:
        raise errors.invalid_field("path", f"{path.name}: {exc}") from None
    return architecture, variant


def _checkpoint_revision(path: Path, identity: str, size: int, rep: Reporter) -> str:
    """The revision of an imported checkpoint: sha256 of its config identity and its bytes, reported as hashing."""
    rep.stage("hashing", size)
    digest = hashlib.sha256(identity.encode() + b"\0")
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            rep.advance(len(chunk))
    return digest.hexdigest()[:16]


def _convert_checkpoint(
    req: ImportRequest, path: Path, config_dir: Path, vocab_dir: Path, staging: Path, architecture: str, rep: Reporter
) -> Converted:
    """Converts a single-file checkpoint into a diffusers folder in `staging`; a failure names the field to blame."""
    from model_manager import single_file

    try:
        return single_file.convert(path, config_dir, vocab_dir, staging, architecture or "the config_from model", rep)
    except single_file.ConversionError as exc:
        field = "architecture" if req.architecture else "config_from" if req.config_from else "path"
        raise errors.invalid(FieldViolation(field, f"{path.name}: {exc}")) from None


def _checkpoint_meta(req: ImportRequest, path: Path, config_dir: Path, architecture: str) -> tuple[dict[str, Any], str]:
    """(sdserve.json defaults of the configs' model, without its revision; description) of a converted checkpoint."""
    meta = model_folder.read_meta_dict(config_dir)
    meta.pop("revision", None)
    description = str(meta.get("description") or "")
    if req.config_from or not description:
        description = f"{path.name}, converted with the configs of {req.config_from or architecture}"
    return meta, description


class Operations:
    """Runs long operations in the calling (worker) thread, reporting through a Reporter."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        hub: Hub,
        metrics: ManagerMetrics | None = None,
        tracer: trace.Tracer | None = None,
    ):
        self.settings = settings
        # Spans of pulls, imports, variants and verifies (sdserve_core.tracing); OpenTelemetry's no-op one when off.
        self.tracer = tracer or trace.NoOpTracer()
        self.store = store
        self.hub = hub
        self.metrics = metrics or ManagerMetrics()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._references: dict[tuple[VariantKey, RenderSpec], Any] = {}
        # Runs while the store is open: the sidecar's server starts it after opening the store and stops it first.
        self.scrubber = Scrubber(store, settings.scrub_interval_seconds, self.metrics)

    # ---- shared helpers -------------------------------------------------------------------

    @contextlib.contextmanager
    def _name_lock(self, name: str, rep: Reporter) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        while not lock.acquire(timeout=0.2):
            rep.check()
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _staging(self, label: str) -> Iterator[Path]:
        path = self.store.layout.new_staging(label)
        try:
            yield path
        finally:
            # After a successful publish the folder has been renamed away; otherwise nothing may stay behind.
            shutil.rmtree(path, ignore_errors=True)

    def _check_name(self, name: str, field: str, kind: str, repo_id: str = "") -> None:
        problem = name_problem(name)
        if problem:
            raise errors.invalid_field(field, f"{name!r} {problem}" if name else problem)
        if self.store.is_alias(name):
            raise errors.invalid_field(field, f"{name!r} is an alias; a model name must not equal an alias")
        theirs = self.store.sources(name)
        local = {"local_folder", "single_file"}
        mine_ok = (
            theirs <= {("hub", repo_id)} if kind == "hub" else all(k in local for k, _ in theirs)
        )  # fmt: skip
        if not mine_ok:
            held = ", ".join(sorted(f"{k} {r}".strip() for k, r in theirs))
            raise errors.AlreadyExists(f"the name {name!r} already holds another source ({held}); choose another name")

    def _manifest(
        self, staging: Path, key: VariantKey, description: str, source: Source, rep: Reporter, q: Quality | None
    ) -> Manifest:
        total = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        rep.stage("verifying", total)
        with self.tracer.start_as_current_span("verify", attributes={**_key_attributes(key), "sdserve.bytes": total}):
            files = hash_folder(staging, on_bytes=rep.advance)
        unet = _read_json(staging / "unet" / "config.json")
        return Manifest(
            name=key.name,
            revision=key.revision,
            variant=key.variant,
            description=description,
            source=source,
            files=files,
            created_at=time.time(),
            unet_in_channels=int(unet.get("in_channels", 4)),
            quality=q,
        )

    def _publish(self, staging: Path, manifest: Manifest, rep: Reporter) -> StoredVariant:
        rep.stage("publishing")
        return self.store.publish(staging, manifest)

    # ---- pull ---------------------------------------------------------------------------

    def pull(self, req: PullRequest, rep: Reporter) -> OperationResult:
        """Resolves, downloads (resuming), verifies and publishes a Hub model; then makes the variant if needed."""
        hub = {"sdserve.hub.repo_id": req.repo_id, "sdserve.hub.revision": req.revision, "sdserve.variant": req.variant}
        self.store.check_writable(f"pulling {req.repo_id}")
        with self.metrics.operation("pull"), self.tracer.start_as_current_span("pull", attributes=hub) as span:
            result = self._pull(req, rep)
            span.set_attributes(_result_attributes(result))
            return result

    def _pull(self, req: PullRequest, rep: Reporter) -> OperationResult:
        name = req.name or req.repo_id.split("/")[-1]
        if not req.name and name_problem(name):
            raise errors.invalid_field("name", f"the repository's name {name!r} is not a valid model name; pass a name")
        self._check_name(name, "name", "hub", req.repo_id)
        with self._name_lock(name, rep):
            rep.stage("resolving", message=f"{req.repo_id}@{req.revision}")
            if self.settings.offline:
                return self._pull_offline(req, name, rep, "offline mode is on")
            try:
                snap = self.hub.resolve(req.repo_id, req.revision)
            except HubUnreachable as exc:
                return self._pull_offline(req, name, rep, str(exc))
            if snap.commit != req.revision:
                self.store.record_hub_ref(req.repo_id, req.revision, snap.commit)
            try:
                selection = select([f.path for f in snap.files], "fp16" if req.variant == "fp16" else None)
            except SelectionError as exc:
                raise errors.invalid_field("repo_id", f"{req.repo_id}@{snap.commit[:12]}: {exc}") from None
            stored = selection.variant or "fp32"
            if req.variant == "fp32" and stored != "fp32":
                raise errors.invalid_field("variant", f"{req.repo_id} has only {stored} weights; pull it as {stored}")
            base = self.store.get(VariantKey(name, snap.commit, stored))
            published: list[StoredVariant] = []
            evicted: list[StoredVariant] = []
            downloaded = resumed = 0
            if base is None or base.state != READY:
                base, downloaded, resumed, evicted = self._fetch(req, name, snap, list(selection.picks), stored, rep)
                published.append(base)
            else:
                self.store.touch(base.key)
            result = base
            if req.variant != stored:
                made, extra_evicted, was_made = self._derive(base, req.variant, None, rep)
                evicted += extra_evicted
                if was_made:
                    published.append(made)
                result = made
            return OperationResult(
                model=self.store.get(result.key) or result,
                also_published=tuple(p for p in published if p.key != result.key),
                already_present=not published,
                downloaded_bytes=downloaded,
                resumed_bytes=resumed,
                evicted=tuple(evicted),
            )

    def _fetch(
        self, req: PullRequest, name: str, snap: RepoSnapshot, picks: list[Pick], stored: str, rep: Reporter
    ) -> tuple[StoredVariant, int, int, list[StoredVariant]]:
        files: list[tuple[RemoteFile, str]] = [(snap.file(p.source), p.dest) for p in picks]
        total = sum(f.size for f, _ in files)
        key = VariantKey(name, snap.commit, stored)
        downloaded = resumed = 0

        def received(n: int) -> None:
            self.metrics.downloaded_bytes.inc(n)
            rep.advance(n)

        try:
            with self.store.reserve(total, f"pulling {req.repo_id}") as evicted, self._staging(name) as staging:
                rep.stage("downloading", total)
                for remote, dest in files:
                    rep.file(remote.path)
                    got, had = self.hub.download(
                        snap, remote, staging / dest, received, rep.cancel, lambda n: rep.advance(n, resumed=True)
                    )
                    downloaded += got
                    resumed += had
                rep.finish_stage()
                _check_weights(staging)
                _check_components(staging, "repo_id", f"{req.repo_id}@{snap.commit[:12]}")
                _strip_pipeline_extras(staging)
                meta = model_folder.read_meta_dict(staging)
                description = str(meta.get("description") or f"{req.repo_id} from the Hugging Face Hub")
                model_folder.write_meta(
                    staging, meta, name=name, revision=snap.commit, variant=stored, description=description
                )
                source = Source("hub", repo_id=req.repo_id, requested_revision=req.revision, commit=snap.commit)
                note = Quality(None, note="fetched as fp16 from the Hub") if stored != "fp32" else None
                manifest = self._manifest(staging, key, description, source, rep, note)
                return self._publish(staging, manifest, rep), downloaded, resumed, evicted
        except OSError as exc:
            if not _disk_full(exc):
                raise
            self.hub.discard_partials([f for f, _ in files])
            raise errors.DiskFull(
                f"the store's disk filled up while pulling {req.repo_id} ({os.strerror(exc.errno or 0)}); "
                "the partial files were removed and nothing was published"
            ) from None

    def _pull_offline(self, req: PullRequest, name: str, rep: Reporter, why: str) -> OperationResult:
        found = [v for v in self.store.find_hub(req.repo_id, req.revision) if v.key.name == name]
        if not found:
            raise errors.Unavailable(
                f"the Hub cannot be reached ({why}) and the store holds no copy of {req.repo_id}@{req.revision}"
            )
        log.warning("hub unreachable; answering from the store", extra={"repo": req.repo_id, "why": why})
        revision = found[0].key.revision
        same = {v.key.variant: v for v in found if v.key.revision == revision}
        if req.variant in same:
            self.store.touch(same[req.variant].key)
            return OperationResult(self.store.get(same[req.variant].key) or same[req.variant], offline=True,
                                   already_present=True)  # fmt: skip
        base = next((same[v] for v in _SOURCES.get(req.variant, ()) if v in same), None)
        if base is None:
            raise errors.Unavailable(
                f"the Hub cannot be reached ({why}) and the store has no {req.variant} variant of "
                f"{req.repo_id}@{req.revision}, nor one to make it from"
            )
        made, evicted, was_made = self._derive(base, req.variant, None, rep)
        return OperationResult(made, offline=True, already_present=not was_made, evicted=tuple(evicted))

    # ---- variants -----------------------------------------------------------------------

    def create_variant(self, req: VariantRequest, rep: Reporter) -> OperationResult:
        """Makes a variant of a stored revision from its best source variant and measures it."""
        asked = {"sdserve.model": req.name, "sdserve.variant": req.variant}
        self.store.check_writable(f"making the {req.variant} variant of {req.name}")
        op = self.tracer.start_as_current_span("create_variant", attributes=asked)
        with self.metrics.operation("create_variant"), op as span:
            result = self._create_variant(req, rep)
            span.set_attributes(_result_attributes(result))
            return result

    def _create_variant(self, req: VariantRequest, rep: Reporter) -> OperationResult:
        with self._name_lock(req.name, rep):
            revision = req.revision or self.store.newest_revision(req.name)
            candidates = {v.key.variant: v for v in self.store.variants(req.name) if v.key.revision == revision}
            if not candidates:
                raise errors.NotFound(f"model {req.name!r} has no revision {revision!r} in the store")
            base = next(iter(candidates.values()))
            made, evicted, was_made = self._derive(base, req.variant, req.measure_quality, rep)
            return OperationResult(made, already_present=not was_made, evicted=tuple(evicted))

    def _derive(
        self, base: StoredVariant, target: str, measure: bool | None, rep: Reporter
    ) -> tuple[StoredVariant, list[StoredVariant], bool]:
        key = VariantKey(base.key.name, base.key.revision, target)
        existing = self.store.get(key)
        if existing is not None and existing.state == READY:
            self.store.touch(key)
            return existing, [], False
        if target == "fp32":
            raise errors.invalid_field("variant", "fp32 comes from a pull or an import; it cannot be made")
        from model_manager import variants  # torch is imported only when a variant is made

        source = None
        for candidate in _SOURCES[target]:
            found = self.store.get(VariantKey(key.name, key.revision, candidate))
            if found is not None and found.state == READY:
                source = found
                break
        if source is None:
            raise errors.FailedPrecondition(
                f"{key.name}@{key.revision[:12]} has no READY {' or '.join(_SOURCES[target])} variant to make "
                f"{target} from"
            )
        with self.store.in_use(source.key):
            estimate = variants.estimate_bytes(source.path, target)
            try:
                with self.store.reserve(estimate, f"making {key.label()}") as evicted, self._staging(key.name) as st:
                    with self.metrics.timed_variant(target):
                        variants.make_variant(source.path, st, target, rep)
                    meta = model_folder.read_meta_dict(source.path)
                    model_folder.write_meta(st, meta, variant=target)
                    q = self._measure(key, st, measure, rep)
                    assert source.manifest is not None
                    origin = source.manifest.source
                    src = dataclasses.replace(origin, kind="derived", derived_from=source.key.variant)
                    manifest = self._manifest(st, key, source.manifest.description, src, rep, q)
                    return self._publish(st, manifest, rep), evicted, True
            except variants.VariantError as exc:
                raise errors.FailedPrecondition(str(exc)) from None
            except OSError as exc:
                if not _disk_full(exc):
                    raise
                raise errors.DiskFull(
                    f"the store's disk filled up while making {key.label()}; nothing was published"
                ) from None

    def _measure(self, key: VariantKey, folder: Path, measure: bool | None, rep: Reporter) -> Quality:
        from model_manager import quality

        s = self.settings
        spec = quality.RenderSpec(size=s.quality_size, steps=s.quality_steps, device=s.quality_device)
        if not (s.quality_check if measure is None else measure):
            return Quality(None, note="not measured (quality check off)")
        reference = self.store.get(VariantKey(key.name, key.revision, "fp32"))
        if reference is None or reference.state != READY:
            return Quality(None, note="no fp32 variant of this revision to compare with")
        size = spec.size or quality.default_size(folder)
        with self.store.in_use(reference.key):
            cache_key = (reference.key, spec)
            ref_image = self._references.get(cache_key)
            if ref_image is None:
                rep.stage("measuring", message="rendering the fp32 reference image")
                ref_image = quality.render(reference.path, "fp32", spec)
                self._references = {cache_key: ref_image}
        rep.stage("measuring", message=f"rendering the {key.variant} image")
        image = quality.render(folder, key.variant, spec)
        value = quality.psnr(ref_image, image)
        log.info("variant quality", extra={"variant": key.label(), "psnr_db": round(value, 2)})
        return Quality(round(value, 3), quality.SEED, spec.steps, size, size, spec.device)

    # ---- import -------------------------------------------------------------------------

    def _import_path(self, raw: str, field: str) -> Path:
        roots = self.settings.import_roots
        if not roots:
            raise errors.invalid_field(
                field, "local imports are disabled: the sidecar has no import folders (set --import-roots)"
            )
        if not raw or not os.path.isabs(raw):
            raise errors.invalid_field(field, f"must be an absolute path on the sidecar's machine, got {raw!r}")
        try:
            resolved = Path(raw).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise errors.invalid_field(field, f"{raw} does not exist") from None
        for root in roots:
            base = root.resolve()
            if resolved == base or resolved.is_relative_to(base):
                return resolved
        shown = ", ".join(str(r) for r in roots)
        raise errors.invalid_field(field, f"{raw} is outside the import folders ({shown}), after resolving links")

    def import_model(self, req: ImportRequest, rep: Reporter) -> OperationResult:
        """Imports a diffusers folder or converts a single-file .safetensors checkpoint."""
        self.store.check_writable(f"importing {req.path}")
        with self.metrics.operation("import"), self.tracer.start_as_current_span("import") as span:
            result = self._import_model(req, rep)
            span.set_attributes(_result_attributes(result))
            return result

    def _import_model(self, req: ImportRequest, rep: Reporter) -> OperationResult:
        path = self._import_path(req.path, "path")
        if path.is_dir():
            return self._import_folder(req, path, rep)
        if is_pickle_name(path.name) or looks_pickled(path):
            raise errors.invalid_field(
                "path",
                f"{path.name} is a pickled checkpoint; sdserve never unpickles untrusted files. "
                "Convert it to .safetensors first",
            )
        if path.suffix != ".safetensors":
            raise errors.invalid_field("path", f"{path.name} must be a diffusers folder or a .safetensors file")
        return self._import_single_file(req, path, rep)

    def _default_name(self, req: ImportRequest, default: str) -> str:
        if req.name:
            return req.name
        if name_problem(default):
            raise errors.invalid_field("name", f"{default!r} cannot be a model name ({NAME_RULE}); pass a name")
        return default

    def _import_folder(self, req: ImportRequest, folder: Path, rep: Reporter) -> OperationResult:
        rel_paths = []
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_paths += [(Path(root) / f).relative_to(folder).as_posix() for f in files]
        try:
            selection = select(rel_paths, subfolders=_folder_components(folder))
        except SelectionError as exc:
            raise errors.invalid_field("path", f"{folder}: {exc}") from None
        for pick in selection.picks:
            self._import_path(str(folder / pick.source), "path")
        name = self._default_name(req, folder.name)
        self._check_name(name, "name", "local_folder")
        total = sum((folder / p.source).stat().st_size for p in selection.picks)
        with self._name_lock(name, rep):
            try:
                with self.store.reserve(total, f"importing {folder}") as evicted, self._staging(name) as staging:
                    rep.stage("copying", total)
                    digest = hashlib.sha256()
                    for pick in sorted(selection.picks, key=lambda p: p.dest):
                        rep.file(pick.dest)
                        digest.update(pick.dest.encode() + b"\0")
                        self._copy(folder / pick.source, staging / pick.dest, digest, rep)
                    rep.finish_stage()
                    revision = digest.hexdigest()[:16]
                    _check_weights(staging)
                    unet_file = next(iter(sorted((staging / "unet").glob("*.safetensors"))))
                    variant = floating_dtype(read_header(unet_file))
                    key = VariantKey(name, revision, variant)
                    existing = self.store.get(key)
                    if existing is not None and existing.state == READY:
                        self.store.touch(key)
                        return OperationResult(existing, already_present=True)
                    _strip_pipeline_extras(staging)
                    meta = model_folder.read_meta_dict(staging)
                    description = str(meta.get("description") or f"imported from {folder}")
                    model_folder.write_meta(
                        staging, meta, name=name, revision=revision, variant=variant, description=description
                    )
                    source = Source("local_folder", path=str(folder))
                    note = None if variant == "fp32" else Quality(None, note=f"imported as {variant}")
                    manifest = self._manifest(staging, key, description, source, rep, note)
                    published = self._publish(staging, manifest, rep)
                    return OperationResult(published, evicted=tuple(evicted))
            except OSError as exc:
                if not _disk_full(exc):
                    raise
                raise errors.DiskFull(f"the store's disk filled up importing {folder}") from None

    def _copy(self, source: Path, dest: Path, digest: Any, rep: Reporter) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as src, dest.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                rep.advance(len(chunk))

    def _config_source(self, req: ImportRequest, architecture: str) -> tuple[Path, str]:
        """(folder with the configs, identity for the revision hash)."""
        from model_manager import single_file

        if not req.config_from:
            return single_file.CONFIGS / architecture, architecture
        if "/" in req.config_from:
            folder = self._import_path(req.config_from, "config_from")
        else:
            if name_problem(req.config_from):
                raise errors.invalid_field("config_from", "must be a stored model name or an absolute folder path")
            folder = self.store.resolve(req.config_from).path
        try:
            encoders = single_file.text_encoders(folder)
        except single_file.ConversionError as exc:
            raise errors.invalid_field("config_from", f"{folder}: {exc}") from None
        # In this order (SD 1.x/2.x: as before SDXL), so a checkpoint converted again keeps its revision.
        needed = ["model_index.json", "unet/config.json", "vae/config.json"]
        needed += [f"{sub}/config.json" for sub in encoders] + ["scheduler/scheduler_config.json"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise errors.invalid_field("config_from", f"{folder} lacks {', '.join(missing)}")
        digest = hashlib.sha256()
        for n in needed:
            digest.update((folder / n).read_bytes())
        return folder, "config:" + digest.hexdigest()[:16]

    def _vocabulary(self, config_dir: Path) -> Path:
        """A tokenizer folder with the CLIP vocabulary the configs' text encoders use (SD 1.x, 2.x and XL, both
        encoders, share one): the configs' own, else any stored model's."""
        from model_manager import single_file

        encoders = single_file.text_encoders(config_dir)
        first = config_dir / (encoders[0] if encoders else "text_encoder") / "config.json"
        vocab_size = int(_read_json(first).get("vocab_size", single_file.CLIP_VOCAB_SIZE))
        folders = [config_dir] + [v.path for v in self.store.variants() if v.state == READY]
        for folder in folders:
            for tokenizer in ("tokenizer", "tokenizer_2"):
                if single_file.is_clip_vocab(folder / tokenizer, vocab_size):
                    return folder / tokenizer
        raise errors.FailedPrecondition(
            "a single-file checkpoint carries no tokenizer vocabulary and the store has no model with a CLIP "
            f"vocabulary of {vocab_size} tokens to borrow one from: pull any Stable Diffusion 1.x, 2.x or XL model "
            "from the Hub first, or pass config_from with a diffusers folder"
        )

    def _import_single_file(self, req: ImportRequest, path: Path, rep: Reporter) -> OperationResult:
        """Converts a single-file checkpoint with the configs of its architecture (or config_from) and publishes it."""
        architecture, variant = _inspect_checkpoint(req, path)
        name = self._default_name(req, path.stem)
        self._check_name(name, "name", "single_file")
        config_dir, identity = self._config_source(req, architecture)
        vocab_dir = self._vocabulary(config_dir)
        size = path.stat().st_size
        with self._name_lock(name, rep):
            revision = _checkpoint_revision(path, identity, size, rep)
            key = VariantKey(name, revision, variant)
            existing = self.store.get(key)
            if existing is not None and existing.state == READY:
                self.store.touch(key)
                return OperationResult(existing, already_present=True)
            try:
                with (
                    self.store.reserve(size + (4 << 20), f"importing {path.name}") as evicted,
                    self._staging(name) as staging,
                ):
                    converted = _convert_checkpoint(req, path, config_dir, vocab_dir, staging, architecture, rep)
                    meta, description = _checkpoint_meta(req, path, config_dir, architecture)
                    model_folder.write_meta(
                        staging, meta, name=name, revision=revision, variant=converted.variant, description=description
                    )
                    source = Source("single_file", path=str(path), architecture=architecture or identity)
                    manifest = self._manifest(staging, key, description, source, rep, None)
                    published = self._publish(staging, manifest, rep)
                    return OperationResult(published, evicted=tuple(evicted))
            except OSError as exc:
                if not _disk_full(exc):
                    raise
                raise errors.DiskFull(f"the store's disk filled up converting {path.name}") from None

    # ---- small operations ----------------------------------------------------------------

    def verify_stored(self, key: VariantKey) -> list[str]:
        """Store.check_variant (a stored variant's files against its manifest) in a `verify` span."""
        with self.tracer.start_as_current_span("verify", attributes=_key_attributes(key)) as span:
            problems = self.store.check_variant(key)
            span.set_attribute("sdserve.problems", len(problems))
            return problems

    def set_alias(
        self, alias: str, model: str, revision: str, variant: str, split: Sequence[tuple[str, str, str, int]] = ()
    ) -> Any:
        """Resolves the target, verifies its files against its manifest, and points the alias at it (see
        Store.set_alias). With `split` ((model, revision, variant, weight) each), a canary alias: every target is
        resolved and verified. A target that fails is marked CORRUPT, the refusal is recorded on the alias, and the
        call fails with FAILED_PRECONDITION naming the file and the rule; the alias does not move."""
        wanted = list(split) or [(model, revision, variant, 0)]
        targets = [(self._verified_target(alias, m, r, v), w) for m, r, v, w in wanted]
        return self.store.set_alias(alias, targets[0][0], targets if split else ())

    def _verified_target(self, alias: str, model: str, revision: str, variant: str) -> Any:
        """The stored variant an alias would point at, verified; FAILED_PRECONDITION (recorded on the alias) when
        its files do not match its manifest."""
        try:
            target = self.store.resolve(model, revision, variant)
        except CorruptVariant as exc:
            self.store.record_refusal(alias, exc.key, exc.message)
            raise
        problems = self.verify_stored(target.key)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            message = (
                f"alias {alias!r} cannot point at {target.key.label()}: its files do not match its manifest, so it "
                f"is corrupt now: {problems[0]}{more}; pull or import it again, or choose another target"
            )
            self.store.record_refusal(alias, target.key, message)
            raise errors.FailedPrecondition(message)
        return target
