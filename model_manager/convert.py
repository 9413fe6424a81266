"""The protobuf edge of the sidecar: requests to validated dataclasses, store views and events to messages."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from model_manager import errors
from model_manager.errors import FieldViolation
from model_manager.layout import StoreLayout
from model_manager.names import hub_revision_problem, name_problem, repo_id_problem
from model_manager.ops import ImportRequest, OperationResult, PullRequest, VariantRequest
from model_manager.progress import Progress
from model_manager.reconcile import EntryStatus, ReconcileStatus
from model_manager.store import (
    DEFAULT_LEASE_SECONDS,
    MAX_LEASE_SECONDS,
    AliasFailure,
    AliasRecord,
    AliasRemoved,
    AliasSet,
    Change,
    Corrupted,
    Published,
    Removed,
    Snapshot,
    StoredVariant,
    Usage,
    VariantKey,
)
from sdserve.v1 import model_manager_pb2 as pb
from sdserve_core.manifest import Manifest

VARIANT_TO_PB = {
    "fp32": pb.WEIGHT_VARIANT_FP32,
    "fp16": pb.WEIGHT_VARIANT_FP16,
    "bf16": pb.WEIGHT_VARIANT_BF16,
    "int8": pb.WEIGHT_VARIANT_INT8,
}
PB_TO_VARIANT: dict[int, str] = {int(v): k for k, v in VARIANT_TO_PB.items()}
_SOURCE_KIND = {
    "hub": pb.SOURCE_KIND_HUB,
    "local_folder": pb.SOURCE_KIND_LOCAL_FOLDER,
    "single_file": pb.SOURCE_KIND_SINGLE_FILE,
    "derived": pb.SOURCE_KIND_DERIVED,
}
_STATE = {"ready": pb.STORED_MODEL_STATE_READY, "corrupt": pb.STORED_MODEL_STATE_CORRUPT}


def _raise(violations: list[FieldViolation]) -> None:
    if violations:
        raise errors.invalid(*violations)


def _name(value: str, field: str, violations: list[FieldViolation], required: bool = True) -> str:
    if value or required:
        problem = name_problem(value)
        if problem:
            violations.append(FieldViolation(field, f"{value!r} {problem}" if value else problem))
    return value


def _variant(value: int, field: str, violations: list[FieldViolation], default: str = "") -> str:
    if value == pb.WEIGHT_VARIANT_UNSPECIFIED:
        return default
    if value not in PB_TO_VARIANT:
        violations.append(FieldViolation(field, f"unknown WeightVariant value {value}"))
        return default
    return PB_TO_VARIANT[value]


def pull_request(msg: pb.PullModelRequest) -> PullRequest:
    violations: list[FieldViolation] = []
    problem = repo_id_problem(msg.repo_id)
    if problem:
        violations.append(FieldViolation("repo_id", problem))
    revision = msg.revision or "main"
    problem = hub_revision_problem(revision)
    if problem:
        violations.append(FieldViolation("revision", problem))
    variant = _variant(msg.variant, "variant", violations, "fp32")
    _name(msg.name, "name", violations, required=False)
    _raise(violations)
    return PullRequest(msg.repo_id, revision, variant, msg.name)


def import_request(msg: pb.ImportModelRequest) -> ImportRequest:
    violations: list[FieldViolation] = []
    if not msg.path:
        violations.append(FieldViolation("path", "is required"))
    elif "\0" in msg.path:
        violations.append(FieldViolation("path", "must not contain NUL characters"))
    _name(msg.name, "name", violations, required=False)
    if "\0" in msg.config_from:
        violations.append(FieldViolation("config_from", "must not contain NUL characters"))
    _raise(violations)
    return ImportRequest(msg.path, msg.name, msg.architecture, msg.config_from)


def variant_request(msg: pb.CreateVariantRequest) -> VariantRequest:
    violations: list[FieldViolation] = []
    _name(msg.name, "name", violations)
    _name(msg.revision, "revision", violations, required=False)
    variant = _variant(msg.variant, "variant", violations)
    if not variant:
        violations.append(FieldViolation("variant", "is required: FP16, BF16 or INT8"))
    elif variant == "fp32":
        violations.append(FieldViolation("variant", "fp32 comes from a pull or an import; choose FP16, BF16 or INT8"))
    _raise(violations)
    measure = msg.measure_quality if msg.HasField("measure_quality") else None
    return VariantRequest(msg.name, variant, msg.revision, measure)


def target(name: str, revision: str, variant: int, prefix: str = "") -> tuple[str, str, str]:
    """(name, revision, variant) of Delete/RecordUse/SetAlias requests, validated."""
    violations: list[FieldViolation] = []
    _name(name, prefix + ("model" if prefix else "name"), violations)
    _name(revision, "revision", violations, required=False)
    v = _variant(variant, "variant", violations)
    _raise(violations)
    return name, revision, v


MAX_ALIAS_TARGETS = 16
MAX_ALIAS_WEIGHT = 1_000_000

AliasTargets = list[tuple[str, str, str, int]]


def set_alias_request(msg: pb.SetAliasRequest) -> tuple[str, str, str, str, AliasTargets]:
    """(alias, model, revision, variant, canary targets) of a SetAlias request, validated: one target (model,
    revision, variant) or a canary split (`targets`: 2 to MAX_ALIAS_TARGETS weighted targets, each model once)."""
    violations: list[FieldViolation] = []
    _name(msg.alias, "alias", violations)
    split: AliasTargets = []
    if msg.targets:
        if msg.model or msg.revision or msg.variant:
            violations.append(
                FieldViolation("model", "must be empty with targets (a canary split names its models there)")
            )
        if not 2 <= len(msg.targets) <= MAX_ALIAS_TARGETS:
            violations.append(FieldViolation("targets", f"2 to {MAX_ALIAS_TARGETS} targets, got {len(msg.targets)}"))
        for i, t in enumerate(msg.targets):
            field = f"targets[{i}]"
            _name(t.model, f"{field}.model", violations)
            _name(t.revision, f"{field}.revision", violations, required=False)
            variant = _variant(t.variant, f"{field}.variant", violations)
            if not 1 <= t.weight <= MAX_ALIAS_WEIGHT:
                violations.append(FieldViolation(f"{field}.weight", f"must be 1 to {MAX_ALIAS_WEIGHT}, got {t.weight}"))
            if any(m == t.model for m, _, _, _ in split):
                violations.append(FieldViolation(f"{field}.model", f"{t.model!r} is named twice"))
            split.append((t.model, t.revision, variant, t.weight))
        _raise(violations)
        return msg.alias, "", "", "", split
    _name(msg.model, "model", violations)
    _name(msg.revision, "revision", violations, required=False)
    variant = _variant(msg.variant, "variant", violations)
    _raise(violations)
    return msg.alias, msg.model, msg.revision, variant, split


MAX_REASON_CHARS = 2000
MAX_LEASED_VARIANTS = 1000


def _variant_ref(ref: pb.VariantRef, field: str, violations: list[FieldViolation]) -> VariantKey:
    _name(ref.name, f"{field}.name", violations)
    _name(ref.revision, f"{field}.revision", violations)
    variant = _variant(ref.variant, f"{field}.variant", violations)
    if ref.variant == pb.WEIGHT_VARIANT_UNSPECIFIED:
        violations.append(FieldViolation(f"{field}.variant", "is required: FP32, FP16, BF16 or INT8"))
    return VariantKey(ref.name, ref.revision, variant)


def lease_request(msg: pb.RenewModelLeasesRequest) -> tuple[str, list[VariantKey], float]:
    """(holder, variants, seconds) of a RenewModelLeases request, validated."""
    violations: list[FieldViolation] = []
    _name(msg.holder, "holder", violations)
    if len(msg.variants) > MAX_LEASED_VARIANTS:
        violations.append(FieldViolation("variants", f"at most {MAX_LEASED_VARIANTS} entries, got {len(msg.variants)}"))
    keys = [_variant_ref(ref, f"variants[{i}]", violations) for i, ref in enumerate(msg.variants)]
    seconds = float(msg.lease_seconds or DEFAULT_LEASE_SECONDS)
    if not 1 <= seconds <= MAX_LEASE_SECONDS:
        violations.append(FieldViolation("lease_seconds", f"must be 1 to {MAX_LEASE_SECONDS:.0f}, got {seconds:.0f}"))
    _raise(violations)
    return msg.holder, keys, seconds


def failure_report(msg: pb.ReportAliasFailureRequest) -> tuple[str, VariantKey, str]:
    """(alias, target, reason) of a ReportAliasFailure request, validated."""
    violations: list[FieldViolation] = []
    _name(msg.alias, "alias", violations)
    if not msg.HasField("target"):
        violations.append(FieldViolation("target", "is required: name, revision and variant"))
    key = _variant_ref(msg.target, "target", violations)
    if not msg.reason:
        violations.append(FieldViolation("reason", "is required"))
    elif len(msg.reason) > MAX_REASON_CHARS:
        violations.append(FieldViolation("reason", f"at most {MAX_REASON_CHARS} characters, got {len(msg.reason)}"))
    _raise(violations)
    return msg.alias, key, msg.reason


def variant_ref(key: VariantKey) -> pb.VariantRef:
    return pb.VariantRef(
        name=key.name, revision=key.revision, variant=VARIANT_TO_PB.get(key.variant, pb.WEIGHT_VARIANT_UNSPECIFIED)
    )


def name_only(value: str, field: str, required: bool = True) -> str:
    violations: list[FieldViolation] = []
    _name(value, field, violations, required)
    _raise(violations)
    return value


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _source(manifest: Manifest | None) -> pb.ModelSource:
    if manifest is None:
        return pb.ModelSource()
    s = manifest.source
    return pb.ModelSource(
        kind=_SOURCE_KIND.get(s.kind, pb.SOURCE_KIND_UNSPECIFIED),
        repo_id=s.repo_id,
        requested_revision=s.requested_revision,
        commit=s.commit,
        path=s.path,
        architecture=s.architecture,
        derived_from=VARIANT_TO_PB.get(s.derived_from, pb.WEIGHT_VARIANT_UNSPECIFIED),
    )


def _quality(manifest: Manifest | None) -> pb.VariantQuality | None:
    if manifest is None or manifest.quality is None:
        return None
    q = manifest.quality
    out = pb.VariantQuality(seed=q.seed, steps=q.steps, width=q.width, height=q.height, device=q.device, note=q.note)
    if q.psnr_db is not None:
        out.psnr_db = q.psnr_db
    return out


def stored_model(view: StoredVariant, files: bool = False) -> pb.StoredModel:
    m = view.manifest
    out = pb.StoredModel(
        name=view.key.name,
        revision=view.key.revision,
        variant=VARIANT_TO_PB[view.key.variant],
        path=str(view.path),
        size_bytes=view.size_bytes,
        state=_STATE[view.state],
        error=view.error,
        description=m.description if m else "",
        source=_source(m),
        created_time=timestamp(view.created_at),
        last_used_time=timestamp(view.last_used),
        pinned=view.pinned,
        aliases=list(view.aliases),
        unet_in_channels=m.unet_in_channels if m else 0,
        family=view.family,
        tasks=list(view.tasks),
    )
    q = _quality(m)
    if q is not None:
        out.quality.CopyFrom(q)
    if files and m is not None:
        out.files.extend(pb.StoredFile(path=f.path, size_bytes=f.size, sha256=f.sha256) for f in m.files)
    if view.lease_holders:
        out.lease_holders = view.lease_holders
        out.lease_expire_time.CopyFrom(timestamp(view.lease_expires_at))
    return out


def alias_failure(f: AliasFailure) -> pb.AliasFailure:
    return pb.AliasFailure(
        target=variant_ref(f.target), reason=f.reason, reporter=f.reporter, time=timestamp(f.at), reverted=f.reverted
    )


def alias(record: AliasRecord, layout: StoreLayout, present: bool = True) -> pb.Alias:
    path = layout.variant_dir(record.model, record.revision, record.variant) if present else ""
    out = pb.Alias(
        name=record.name,
        model=record.model,
        revision=record.revision,
        variant=VARIANT_TO_PB.get(record.variant, pb.WEIGHT_VARIANT_UNSPECIFIED),
        path=str(path),
        updated_time=timestamp(record.updated_at),
    )
    if record.revert_to is not None:
        out.revert_to.CopyFrom(variant_ref(record.revert_to))
    if record.failure is not None:
        out.last_failure.CopyFrom(alias_failure(record.failure))
    for key, weight in record.split:
        out.targets.append(
            pb.AliasTarget(
                model=key.name,
                revision=key.revision,
                variant=VARIANT_TO_PB.get(key.variant, pb.WEIGHT_VARIANT_UNSPECIFIED),
                weight=weight,
                path=str(layout.variant_dir(key.name, key.revision, key.variant)) if present else "",
            )
        )
    return out


def usage(u: Usage, read_only: bool = False) -> pb.StoreUsage:
    return pb.StoreUsage(
        store_path=str(u.store_path),
        used_bytes=u.used_bytes,
        budget_bytes=u.budget_bytes,
        protected_bytes=u.protected_bytes,
        partial_bytes=u.partial_bytes,
        filesystem_free_bytes=u.free_bytes,
        read_only=read_only,
    )


def declared_entry(e: EntryStatus) -> pb.DeclaredEntryStatus:
    return pb.DeclaredEntryStatus(entry=e.entry, name=e.name, state=e.state, reason=e.reason, detail=e.detail)


def declared_status(s: ReconcileStatus) -> pb.DeclaredStateStatus:
    """The declared state's progress and drift (ListStoredModelsResponse.declared)."""
    out = pb.DeclaredStateStatus(
        path=s.path,
        sha256=s.sha256,
        running=s.running,
        file_error=s.file_error,
        converged=s.converged,
        activity=s.activity,
        entries=[declared_entry(e) for e in s.entries],
    )
    if s.last_pass_at:
        out.last_pass_time.CopyFrom(timestamp(s.last_pass_at))
    if s.last_success_at:
        out.last_success_time.CopyFrom(timestamp(s.last_success_at))
    return out


def progress(p: Progress) -> pb.OperationProgress:
    return pb.OperationProgress(
        stage=p.stage,
        file=p.file,
        done_bytes=p.done_bytes,
        total_bytes=p.total_bytes,
        resumed_bytes=p.resumed_bytes,
        message=p.message,
    )


def result(r: OperationResult) -> pb.OperationResult:
    return pb.OperationResult(
        model=stored_model(r.model),
        also_published=[stored_model(v) for v in r.also_published],
        already_present=r.already_present,
        offline=r.offline,
        downloaded_bytes=r.downloaded_bytes,
        resumed_bytes=r.resumed_bytes,
        evicted=[stored_model(v) for v in r.evicted],
    )


def snapshot(s: Snapshot, layout: StoreLayout) -> pb.WatchModelsResponse:
    return pb.WatchModelsResponse(
        sequence=s.sequence,
        time=timestamp(time.time()),
        snapshot=pb.StoreSnapshot(
            models=[stored_model(v) for v in s.variants],
            aliases=[alias(r, layout, t is not None) for r, t in s.aliases],
            store_path=str(layout.root),
            instance_id=s.instance_id,
            adapters_dir=str(layout.adapters),
        ),
    )


def change(c: Change, layout: StoreLayout) -> pb.WatchModelsResponse:
    out = pb.WatchModelsResponse(sequence=c.sequence, time=timestamp(c.time))
    event = c.event
    if isinstance(event, Published):
        out.model_published.model.CopyFrom(stored_model(event.variant))
    elif isinstance(event, Removed):
        out.model_removed.model.CopyFrom(stored_model(event.variant))
        out.model_removed.reason = event.reason
    elif isinstance(event, AliasSet):
        out.alias_set.alias.CopyFrom(alias(event.alias, layout))
        out.alias_set.target.CopyFrom(stored_model(event.target))
        if event.previous is not None:
            out.alias_set.previous.CopyFrom(alias(event.previous, layout))
        out.alias_set.reverted = event.reverted
        out.alias_set.reason = event.reason
    elif isinstance(event, AliasRemoved):
        out.alias_removed.alias.CopyFrom(alias(event.alias, layout))
    elif isinstance(event, Corrupted):
        out.model_corrupted.model.CopyFrom(stored_model(event.variant))
        out.model_corrupted.problems.extend(event.problems)
    return out


# ---- replies ----------------------------------------------------------------------------------

AliasRows = list[tuple[AliasRecord, StoredVariant | None]]


def _aliases(rows: AliasRows, layout: StoreLayout) -> list[pb.Alias]:
    return [alias(r, layout, t is not None) for r, t in rows]


def list_reply(
    views: list[StoredVariant], rows: AliasRows, u: Usage, layout: StoreLayout
) -> pb.ListStoredModelsResponse:
    """ListStoredModels: the variants, every alias (whether its target is present) and the store's usage."""
    return pb.ListStoredModelsResponse(
        models=[stored_model(v) for v in views], aliases=_aliases(rows, layout), usage=usage(u)
    )


def get_reply(views: list[StoredVariant], rows: AliasRows, layout: StoreLayout) -> pb.GetStoredModelResponse:
    """GetStoredModel: one model's variants with their files, and the aliases that point at it."""
    return pb.GetStoredModelResponse(
        variants=[stored_model(v, files=True) for v in views], aliases=_aliases(rows, layout)
    )


def delete_reply(removed: list[StoredVariant]) -> pb.DeleteStoredModelResponse:
    """DeleteStoredModel: what was removed and the bytes freed."""
    return pb.DeleteStoredModelResponse(
        removed=[stored_model(v) for v in removed], freed_bytes=sum(v.size_bytes for v in removed)
    )


def pin_reply(views: list[StoredVariant]) -> pb.PinStoredModelResponse:
    return pb.PinStoredModelResponse(variants=[stored_model(v) for v in views])


def use_reply() -> pb.RecordModelUseResponse:
    return pb.RecordModelUseResponse()


def lease_reply(unknown: list[VariantKey], expires: float) -> pb.RenewModelLeasesResponse:
    """RenewModelLeases: the variants the store does not have, and when the leases end."""
    return pb.RenewModelLeasesResponse(unknown=[variant_ref(k) for k in unknown], expire_time=timestamp(expires))


def failure_reply(
    record: AliasRecord, present: bool, reverted: bool, layout: StoreLayout
) -> pb.ReportAliasFailureResponse:
    """ReportAliasFailure: the alias now, and whether it moved back."""
    return pb.ReportAliasFailureResponse(alias=alias(record, layout, present), reverted=reverted)


def set_alias_reply(
    record: AliasRecord, previous: AliasRecord | None, previous_present: bool, layout: StoreLayout
) -> pb.SetAliasResponse:
    """SetAlias: the alias now and, when it existed, what it pointed at before."""
    out = pb.SetAliasResponse(alias=alias(record, layout))
    if previous is not None:
        out.previous.CopyFrom(alias(previous, layout, previous_present))
    return out


def delete_alias_reply(record: AliasRecord, present: bool, layout: StoreLayout) -> pb.DeleteAliasResponse:
    return pb.DeleteAliasResponse(alias=alias(record, layout, present))
