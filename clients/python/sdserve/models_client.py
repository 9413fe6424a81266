"""Typed clients for the model-manager sidecar (sdserve.v1.ModelManagerService): sync, and asyncio for servers."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import grpc

from sdserve.client import metadata, traced

# Re-exported (the store commands read the same PEM files); `as` marks it public for type checkers.
from sdserve.client import tls_credentials as tls_credentials  # noqa: PLC0414
from sdserve.errors import SdserveError, from_rpc_error
from sdserve.v1 import model_manager_pb2 as pb
from sdserve.v1 import model_manager_pb2_grpc as pb_grpc

VariantName = Literal["fp32", "fp16", "bf16", "int8"]
DEFAULT_TARGET = "127.0.0.1:50052"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_VARIANT_TO_PB = {
    "": pb.WEIGHT_VARIANT_UNSPECIFIED,
    "fp32": pb.WEIGHT_VARIANT_FP32,
    "fp16": pb.WEIGHT_VARIANT_FP16,
    "bf16": pb.WEIGHT_VARIANT_BF16,
    "int8": pb.WEIGHT_VARIANT_INT8,
}
_PB_TO_VARIANT = {int(v): k for k, v in _VARIANT_TO_PB.items()}
_SOURCE_KIND = {
    pb.SOURCE_KIND_HUB: "hub",
    pb.SOURCE_KIND_LOCAL_FOLDER: "local_folder",
    pb.SOURCE_KIND_SINGLE_FILE: "single_file",
    pb.SOURCE_KIND_DERIVED: "derived",
}
_STATE = {pb.STORED_MODEL_STATE_READY: "ready", pb.STORED_MODEL_STATE_CORRUPT: "corrupt"}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a stored variant came from (kind: hub, local_folder, single_file or derived)."""

    kind: str
    repo_id: str
    requested_revision: str
    commit: str
    path: str
    architecture: str
    derived_from: str


@dataclasses.dataclass(frozen=True)
class VariantQuality:
    """PSNR (dB) of the variant's image against fp32's for the same seed; None when not measured (see note)."""

    psnr_db: float | None
    seed: int
    steps: int
    width: int
    height: int
    device: str
    note: str


@dataclasses.dataclass(frozen=True)
class StoredFile:
    """One file of a stored variant."""

    path: str
    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """One stored variant of one revision of a model; `path` is its diffusers folder on the sidecar's machine."""

    name: str
    revision: str
    variant: str
    path: str
    size_bytes: int
    state: str
    error: str
    description: str
    source: ModelSource
    created_at: float
    last_used_at: float
    pinned: bool
    aliases: tuple[str, ...]
    quality: VariantQuality | None
    unet_in_channels: int
    files: tuple[StoredFile, ...] = ()
    # Servers holding an unexpired lease on it (loaded or aliased there: not evicted), and when the last one ends.
    lease_holders: int = 0
    lease_expires_at: float = 0.0
    # The model family (`sd15`, `sdxl`) and its tasks (`generate`, `edit`, `inpaint`; `refine` for a refiner).
    family: str = ""
    tasks: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.name}@{self.revision[:12]}:{self.variant}"


@dataclasses.dataclass(frozen=True)
class VariantRef:
    """Names one stored variant."""

    name: str
    revision: str
    variant: str

    def label(self) -> str:
        return f"{self.name}@{self.revision[:12]}:{self.variant}"


@dataclasses.dataclass(frozen=True)
class AliasFailure:
    """A target an alias was pointed at that could not serve, why, who found it (sidecar, scrub or server), when,
    and whether the alias went back to its previous target because of it."""

    target: VariantRef
    reason: str
    reporter: str
    at: float
    reverted: bool


@dataclasses.dataclass(frozen=True)
class AliasTarget:
    """One weighted target of a canary alias (`path` is empty when the target is missing)."""

    model: str
    revision: str
    variant: str
    weight: int
    path: str = ""

    def label(self) -> str:
        return f"{self.model}@{self.revision[:12]}:{self.variant}*{self.weight}"


@dataclasses.dataclass(frozen=True)
class Alias:
    """An alias and the variant it points at (`path` is empty when the target is missing).

    `revert_to` is where it goes back if its target fails; `last_failure` the last target that failed under it.
    A canary alias has `targets` (two or more, weighted; the first is model/revision/variant): servers split the
    requests naming it between them by weight (docs/canary.md)."""

    name: str
    model: str
    revision: str
    variant: str
    path: str
    updated_at: float
    revert_to: VariantRef | None = None
    last_failure: AliasFailure | None = None
    targets: tuple[AliasTarget, ...] = ()


@dataclasses.dataclass(frozen=True)
class StoreUsage:
    """Disk usage of the store, in bytes (budget 0: no budget)."""

    store_path: str
    used_bytes: int
    budget_bytes: int
    protected_bytes: int
    partial_bytes: int
    filesystem_free_bytes: int
    # A shared read-only store (--read-only-store): pulls, imports, variants and removals are refused.
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class DeclaredEntry:
    """One declared-state entry: its place in the file (models[0], aliases.default), its name, its state (pending,
    running, ready or failed), why it failed, and what it holds (ready variants, the alias's target)."""

    entry: str
    name: str
    state: str
    reason: str
    detail: str


@dataclasses.dataclass(frozen=True)
class DeclaredStatus:
    """Where the sidecar's declared state stands (docs/declared-state.md); times are seconds since the epoch, 0 when
    there was none yet. `converged`: the store holds everything the applied file declares."""

    path: str
    sha256: str
    running: bool
    file_error: str
    last_pass_at: float
    last_success_at: float
    converged: bool
    activity: str
    entries: tuple[DeclaredEntry, ...]


@dataclasses.dataclass(frozen=True)
class Listing:
    """ListStoredModels: every variant, every alias and the disk usage; `declared` with --declared-state."""

    models: tuple[StoredModel, ...]
    aliases: tuple[Alias, ...]
    usage: StoreUsage
    declared: DeclaredStatus | None = None


@dataclasses.dataclass(frozen=True)
class ModelDetails:
    """GetStoredModel: a model's variants (with files) and the aliases that point at them."""

    variants: tuple[StoredModel, ...]
    aliases: tuple[Alias, ...]
    # Its declared-state entries (its model entry, the declared aliases on it); empty without --declared-state.
    declared: tuple[DeclaredEntry, ...] = ()


@dataclasses.dataclass(frozen=True)
class OperationProgress:
    """Progress of a pull, import or variant operation."""

    stage: str
    file: str
    done_bytes: int
    total_bytes: int
    resumed_bytes: int
    message: str


@dataclasses.dataclass(frozen=True)
class OperationResult:
    """The outcome of a pull, import or variant operation."""

    model: StoredModel
    also_published: tuple[StoredModel, ...]
    already_present: bool
    offline: bool
    downloaded_bytes: int
    resumed_bytes: int
    evicted: tuple[StoredModel, ...]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The first WatchModels message: the whole store (instance_id changes when the sidecar restarts)."""

    sequence: int
    time: float
    models: tuple[StoredModel, ...]
    aliases: tuple[Alias, ...]
    store_path: str
    instance_id: str
    # The store's adapters folder (<store>/adapters); empty from a sidecar without adapters.
    adapters_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ModelPublished:
    """A variant was published."""

    sequence: int
    time: float
    model: StoredModel


@dataclasses.dataclass(frozen=True)
class ModelRemoved:
    """A variant was removed; reason is 'deleted' or 'evicted'."""

    sequence: int
    time: float
    model: StoredModel
    reason: str


@dataclasses.dataclass(frozen=True)
class AliasSet:
    """An alias now points at `target` (load target.path and swap). `reverted`: the sidecar moved it back because
    the target it left failed (`reason`)."""

    sequence: int
    time: float
    alias: Alias
    target: StoredModel
    previous: Alias | None
    reverted: bool = False
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class AliasRemoved:
    """An alias was removed."""

    sequence: int
    time: float
    alias: Alias


@dataclasses.dataclass(frozen=True)
class ModelCorrupted:
    """A variant failed verification after it was published; it is CORRUPT now (problems: one line per file)."""

    sequence: int
    time: float
    model: StoredModel
    problems: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class StoredAdapter:
    """A stored adapter (kind `lora` or `textual_inversion`); `path` is its folder on the sidecar's machine, holding
    adapter.safetensors and adapter.json. `base` is the architecture it fits (`cross_attention_dim=768,...`);
    `error` is set when its file no longer matches its recorded sha256."""

    name: str
    kind: str
    layout: str
    family: str
    base: str
    targets: tuple[str, ...]
    token: str
    sha256: str
    size_bytes: int
    source: str
    path: str
    error: str = ""
    created_at: float = 0.0


@dataclasses.dataclass(frozen=True)
class AdapterResult:
    """The outcome of an adapter pull or import."""

    adapter: StoredAdapter
    already_present: bool
    replaced: bool
    downloaded_bytes: int
    resumed_bytes: int


@dataclasses.dataclass(frozen=True)
class AdapterListing:
    """ListAdapters: every stored adapter and the store's adapters folder."""

    adapters: tuple[StoredAdapter, ...]
    adapters_dir: str


WatchEvent = Snapshot | ModelPublished | ModelRemoved | AliasSet | AliasRemoved | ModelCorrupted
OperationEvent = OperationProgress | OperationResult


def _seconds(ts: Any) -> float:
    return float(ts.seconds) + float(ts.nanos) / 1e9


def _model(m: pb.StoredModel) -> StoredModel:
    s = m.source
    q = m.quality if m.HasField("quality") else None
    return StoredModel(
        name=m.name,
        revision=m.revision,
        variant=_PB_TO_VARIANT.get(m.variant, ""),
        path=m.path,
        size_bytes=m.size_bytes,
        state=_STATE.get(m.state, "unknown"),
        error=m.error,
        description=m.description,
        source=ModelSource(
            _SOURCE_KIND.get(s.kind, ""),
            s.repo_id,
            s.requested_revision,
            s.commit,
            s.path,
            s.architecture,
            _PB_TO_VARIANT.get(s.derived_from, ""),
        ),
        created_at=_seconds(m.created_time),
        last_used_at=_seconds(m.last_used_time),
        pinned=m.pinned,
        aliases=tuple(m.aliases),
        quality=None
        if q is None
        else VariantQuality(
            q.psnr_db if q.HasField("psnr_db") else None, q.seed, q.steps, q.width, q.height, q.device, q.note
        ),
        unet_in_channels=m.unet_in_channels,
        files=tuple(StoredFile(f.path, f.size_bytes, f.sha256) for f in m.files),
        lease_holders=m.lease_holders,
        lease_expires_at=_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else 0.0,
        family=m.family,
        tasks=tuple(m.tasks),
    )


def _ref(r: pb.VariantRef) -> VariantRef:
    return VariantRef(r.name, r.revision, _PB_TO_VARIANT.get(r.variant, ""))


def _alias(a: pb.Alias) -> Alias:
    f = a.last_failure if a.HasField("last_failure") else None
    return Alias(
        a.name,
        a.model,
        a.revision,
        _PB_TO_VARIANT.get(a.variant, ""),
        a.path,
        _seconds(a.updated_time),
        _ref(a.revert_to) if a.HasField("revert_to") else None,
        None if f is None else AliasFailure(_ref(f.target), f.reason, f.reporter, _seconds(f.time), f.reverted),
        tuple(AliasTarget(t.model, t.revision, _PB_TO_VARIANT.get(t.variant, ""), t.weight, t.path) for t in a.targets),
    )


def _usage(u: pb.StoreUsage) -> StoreUsage:
    return StoreUsage(
        u.store_path,
        u.used_bytes,
        u.budget_bytes,
        u.protected_bytes,
        u.partial_bytes,
        u.filesystem_free_bytes,
        u.read_only,
    )


def _declared_entry(e: pb.DeclaredEntryStatus) -> DeclaredEntry:
    return DeclaredEntry(e.entry, e.name, e.state, e.reason, e.detail)


def _listing(resp: pb.ListStoredModelsResponse) -> Listing:
    d = resp.declared if resp.HasField("declared") else None
    declared = (
        None
        if d is None
        else DeclaredStatus(
            d.path,
            d.sha256,
            d.running,
            d.file_error,
            _seconds(d.last_pass_time) if d.HasField("last_pass_time") else 0.0,
            _seconds(d.last_success_time) if d.HasField("last_success_time") else 0.0,
            d.converged,
            d.activity,
            tuple(_declared_entry(e) for e in d.entries),
        )
    )
    return Listing(
        tuple(_model(m) for m in resp.models), tuple(_alias(a) for a in resp.aliases), _usage(resp.usage), declared
    )


def _details(resp: pb.GetStoredModelResponse) -> ModelDetails:
    return ModelDetails(
        tuple(_model(m) for m in resp.variants),
        tuple(_alias(a) for a in resp.aliases),
        tuple(_declared_entry(e) for e in resp.declared),
    )


def _operation_event(msg: Any) -> OperationEvent:
    if msg.WhichOneof("event") == "progress":
        p = msg.progress
        return OperationProgress(p.stage, p.file, p.done_bytes, p.total_bytes, p.resumed_bytes, p.message)
    r = msg.result
    return OperationResult(
        model=_model(r.model),
        also_published=tuple(_model(m) for m in r.also_published),
        already_present=r.already_present,
        offline=r.offline,
        downloaded_bytes=r.downloaded_bytes,
        resumed_bytes=r.resumed_bytes,
        evicted=tuple(_model(m) for m in r.evicted),
    )


_ADAPTER_KIND = {1: "lora", 2: "textual_inversion"}  # sdserve.v1.AdapterKind


def _adapter(a: pb.StoredAdapter) -> StoredAdapter:
    return StoredAdapter(
        name=a.name,
        kind=_ADAPTER_KIND.get(int(a.kind), ""),
        layout=a.layout,
        family=a.family,
        base=a.base,
        targets=tuple(a.targets),
        token=a.token,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        source=a.source,
        path=a.path,
        error=a.error,
        created_at=_seconds(a.created_time),
    )


def _adapter_event(msg: Any) -> OperationProgress | AdapterResult:
    if msg.WhichOneof("event") == "progress":
        p = msg.progress
        return OperationProgress(p.stage, p.file, p.done_bytes, p.total_bytes, p.resumed_bytes, p.message)
    r = msg.result
    return AdapterResult(_adapter(r.adapter), r.already_present, r.replaced, r.downloaded_bytes, r.resumed_bytes)


def watch_event(msg: pb.WatchModelsResponse) -> WatchEvent:
    """Converts one WatchModels message."""
    seq, when = msg.sequence, _seconds(msg.time)
    kind = msg.WhichOneof("event")
    if kind == "snapshot":
        s = msg.snapshot
        return Snapshot(
            seq,
            when,
            tuple(_model(m) for m in s.models),
            tuple(_alias(a) for a in s.aliases),
            s.store_path,
            s.instance_id,
            s.adapters_dir,
        )
    if kind == "model_published":
        return ModelPublished(seq, when, _model(msg.model_published.model))
    if kind == "model_removed":
        return ModelRemoved(seq, when, _model(msg.model_removed.model), msg.model_removed.reason)
    if kind == "alias_set":
        e = msg.alias_set
        return AliasSet(
            seq,
            when,
            _alias(e.alias),
            _model(e.target),
            _alias(e.previous) if e.HasField("previous") else None,
            e.reverted,
            e.reason,
        )
    if kind == "alias_removed":
        return AliasRemoved(seq, when, _alias(msg.alias_removed.alias))
    if kind == "model_corrupted":
        c = msg.model_corrupted
        return ModelCorrupted(seq, when, _model(c.model), tuple(c.problems))
    raise SdserveError("UNKNOWN", f"unknown WatchModels event {kind!r}")


def _variant(value: str, field: str = "variant") -> Any:
    try:
        return _VARIANT_TO_PB[value]
    except KeyError:
        raise SdserveError("INVALID_ARGUMENT", f"{field}: must be fp32, fp16, bf16 or int8, got {value!r}") from None


def _lease_request(holder: str, variants: Iterable[tuple[str, str, str]], seconds: int) -> pb.RenewModelLeasesRequest:
    return pb.RenewModelLeasesRequest(
        holder=holder,
        variants=[pb.VariantRef(name=n, revision=r, variant=_variant(v)) for n, r, v in variants],
        lease_seconds=seconds,
    )


def _failure_request(alias: str, model: str, revision: str, variant: str, reason: str) -> pb.ReportAliasFailureRequest:
    return pb.ReportAliasFailureRequest(
        alias=alias, target=pb.VariantRef(name=model, revision=revision, variant=_variant(variant)), reason=reason
    )


def _channel_options(extra: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The message limits and a connection of the channel's own (see sdserve.client.channel_options), with `extra`
    channel arguments added (one named here replaces its default)."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.use_local_subchannel_pool": 1,
    }
    options.update(extra)
    return list(options.items())


class OperationStream:
    """Iterates a long operation's OperationProgress events and its final OperationResult; cancel() cancels it."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> Iterator[OperationEvent]:
        try:
            for msg in self._call:
                yield _operation_event(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def events(self) -> Iterator[Any]:
        """The stream's events, whatever the operation's result type."""
        yield from self

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> OperationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def result(self, on_progress: Callable[[OperationProgress], None] | None = None) -> OperationResult:
        """Consumes the stream, calling on_progress per report, and returns the result."""
        for ev in self.events():
            if not isinstance(ev, OperationProgress):
                return ev  # type: ignore[no-any-return]
            if on_progress is not None:
                on_progress(ev)
        raise SdserveError("UNKNOWN", "the operation ended without a result")


class AdapterStream(OperationStream):
    """Iterates an adapter pull's or import's OperationProgress events and its final AdapterResult."""

    def events(self) -> Iterator[OperationProgress | AdapterResult]:
        try:
            for msg in self._call:
                yield _adapter_event(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def __iter__(self) -> Iterator[Any]:
        return self.events()

    def __enter__(self) -> AdapterStream:
        return self

    def adapter_result(self, on_progress: Callable[[OperationProgress], None] | None = None) -> AdapterResult:
        """Consumes the stream, calling on_progress per report, and returns the result."""
        result: Any = self.result(on_progress)
        assert isinstance(result, AdapterResult)
        return result


class WatchStream:
    """Iterates WatchModels events (a Snapshot first); cancel() ends the subscription."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> Iterator[WatchEvent]:
        try:
            for msg in self._call:
                yield watch_event(msg)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(err) from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class ModelManagerClient:
    """A blocking client for the sidecar at `target` ('host:port' or 'unix:/path'). Use as a context manager.

    `api_key` is sent as 'authorization: Bearer KEY' on every call; `credentials` (see tls_credentials) make the
    channel TLS. The sidecar's Unix socket is plaintext: use credentials with a host:port target only."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        timeout: float = 60.0,
    ):
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials, options=_channel_options())
                if credentials is not None
                else grpc.insecure_channel(target, options=_channel_options())
            )
        self._channel = channel
        self._stub = pb_grpc.ModelManagerServiceStub(self._channel)
        self._metadata = metadata(api_key)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=traced(self._metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # Long operations --------------------------------------------------------------------------

    def stream_pull(self, repo_id: str, *, revision: str = "", variant: str = "", name: str = "") -> OperationStream:
        """Pulls a Hub repository as a stream of progress events and a result (no deadline)."""
        req = pb.PullModelRequest(repo_id=repo_id, revision=revision, variant=_variant(variant), name=name)
        return OperationStream(self._stub.PullModel(req, metadata=traced(self._metadata)))

    def pull(
        self,
        repo_id: str,
        *,
        revision: str = "",
        variant: str = "",
        name: str = "",
        on_progress: Callable[[OperationProgress], None] | None = None,
    ) -> OperationResult:
        """Pulls and waits; see stream_pull."""
        with self.stream_pull(repo_id, revision=revision, variant=variant, name=name) as stream:
            return stream.result(on_progress)

    def stream_import(
        self, path: str, *, name: str = "", architecture: str = "", config_from: str = ""
    ) -> OperationStream:
        """Imports a folder or single-file checkpoint on the sidecar's machine."""
        req = pb.ImportModelRequest(path=path, name=name, architecture=architecture, config_from=config_from)
        return OperationStream(self._stub.ImportModel(req, metadata=traced(self._metadata)))

    def import_model(
        self,
        path: str,
        *,
        name: str = "",
        architecture: str = "",
        config_from: str = "",
        on_progress: Callable[[OperationProgress], None] | None = None,
    ) -> OperationResult:
        """Imports and waits; see stream_import."""
        with self.stream_import(path, name=name, architecture=architecture, config_from=config_from) as stream:
            return stream.result(on_progress)

    def stream_create_variant(
        self, name: str, variant: str, *, revision: str = "", measure_quality: bool | None = None
    ) -> OperationStream:
        """Makes an fp16, bf16 or int8 variant of a stored revision (default: the newest)."""
        req = pb.CreateVariantRequest(name=name, revision=revision, variant=_variant(variant))
        if measure_quality is not None:
            req.measure_quality = measure_quality
        return OperationStream(self._stub.CreateVariant(req, metadata=traced(self._metadata)))

    def create_variant(
        self,
        name: str,
        variant: str,
        *,
        revision: str = "",
        measure_quality: bool | None = None,
        on_progress: Callable[[OperationProgress], None] | None = None,
    ) -> OperationResult:
        """Makes a variant and waits; see stream_create_variant."""
        with self.stream_create_variant(name, variant, revision=revision, measure_quality=measure_quality) as s:
            return s.result(on_progress)

    # Store ------------------------------------------------------------------------------------

    def list(self, name: str = "") -> Listing:
        resp = self._unary(self._stub.ListStoredModels, pb.ListStoredModelsRequest(name=name))
        return _listing(resp)

    def get(self, name: str) -> ModelDetails:
        resp = self._unary(self._stub.GetStoredModel, pb.GetStoredModelRequest(name=name))
        return _details(resp)

    def delete(self, name: str, *, revision: str = "", variant: str = "") -> tuple[tuple[StoredModel, ...], int]:
        """Removes variants; returns (removed, bytes freed)."""
        req = pb.DeleteStoredModelRequest(name=name, revision=revision, variant=_variant(variant))
        resp = self._unary(self._stub.DeleteStoredModel, req)
        return tuple(_model(m) for m in resp.removed), resp.freed_bytes

    def pin(self, name: str, pinned: bool = True) -> tuple[StoredModel, ...]:
        resp = self._unary(self._stub.PinStoredModel, pb.PinStoredModelRequest(name=name, pinned=pinned))
        return tuple(_model(m) for m in resp.variants)

    def record_use(self, name: str, revision: str, variant: str) -> None:
        req = pb.RecordModelUseRequest(name=name, revision=revision, variant=_variant(variant))
        self._unary(self._stub.RecordModelUse, req)

    def renew_leases(
        self, holder: str, variants: Iterable[tuple[str, str, str]], *, lease_seconds: int = 0
    ) -> tuple[tuple[VariantRef, ...], float]:
        """Replaces `holder`'s leases with (name, revision, variant) triples for `lease_seconds` (0: the sidecar's
        default); an empty list releases them. Returns (entries not in the store, when the leases end)."""
        req = _lease_request(holder, variants, lease_seconds)
        resp = self._unary(self._stub.RenewModelLeases, req)
        return tuple(_ref(r) for r in resp.unknown), _seconds(resp.expire_time)

    def report_alias_failure(
        self, alias: str, model: str, revision: str, variant: str, reason: str
    ) -> tuple[Alias, bool]:
        """Tells the sidecar a server could not serve `alias`'s target; returns (the alias now, whether it moved
        back to its previous target)."""
        req = _failure_request(alias, model, revision, variant, reason)
        resp = self._unary(self._stub.ReportAliasFailure, req)
        return _alias(resp.alias), resp.reverted

    def set_alias(
        self,
        alias: str,
        model: str = "",
        *,
        revision: str = "",
        variant: str = "",
        targets: Sequence[tuple[str, str, str, int]] = (),
    ) -> tuple[Alias, Alias | None]:
        """Points `alias` at a model (default: its newest revision and preferred variant), or with `targets`
        ((model, revision, variant, weight) each; revision and variant may be empty) makes it a canary alias split
        between them by weight; returns (new, previous)."""
        req = pb.SetAliasRequest(alias=alias, model=model, revision=revision, variant=_variant(variant))
        for i, (m, r, v, w) in enumerate(targets):
            req.targets.append(
                pb.AliasTarget(model=m, revision=r, variant=_variant(v, f"targets[{i}].variant"), weight=w)
            )
        resp = self._unary(self._stub.SetAlias, req)
        return _alias(resp.alias), _alias(resp.previous) if resp.HasField("previous") else None

    def delete_alias(self, alias: str) -> Alias:
        return _alias(self._unary(self._stub.DeleteAlias, pb.DeleteAliasRequest(alias=alias)).alias)

    def watch(self) -> WatchStream:
        """Subscribes to store changes: a Snapshot, then one event per change, until cancel()."""
        return WatchStream(self._stub.WatchModels(pb.WatchModelsRequest(), metadata=traced(self._metadata)))

    # Adapters ---------------------------------------------------------------------------------

    def stream_pull_adapter(
        self, repo_id: str, *, revision: str = "", filename: str = "", name: str = "", token: str = "",
        replace: bool = False,
    ) -> AdapterStream:  # fmt: skip
        """Pulls one LoRA or textual-inversion .safetensors file from a Hub repository (`filename`: required when the
        repository has several) as a stream of progress events and an AdapterResult."""
        req = pb.PullAdapterRequest(
            repo_id=repo_id, revision=revision, filename=filename, name=name, token=token, replace=replace
        )
        return AdapterStream(self._stub.PullAdapter(req, metadata=traced(self._metadata)))

    def pull_adapter(
        self, repo_id: str, *, revision: str = "", filename: str = "", name: str = "", token: str = "",
        replace: bool = False, on_progress: Callable[[OperationProgress], None] | None = None,
    ) -> AdapterResult:  # fmt: skip
        """Pulls an adapter and waits; see stream_pull_adapter."""
        stream = self.stream_pull_adapter(
            repo_id, revision=revision, filename=filename, name=name, token=token, replace=replace
        )
        with stream:
            return stream.adapter_result(on_progress)

    def stream_import_adapter(
        self, path: str, *, name: str = "", token: str = "", replace: bool = False
    ) -> AdapterStream:
        """Stores a .safetensors adapter file on the sidecar's machine (inside its import folders)."""
        req = pb.ImportAdapterRequest(path=path, name=name, token=token, replace=replace)
        return AdapterStream(self._stub.ImportAdapter(req, metadata=traced(self._metadata)))

    def import_adapter(
        self, path: str, *, name: str = "", token: str = "", replace: bool = False,
        on_progress: Callable[[OperationProgress], None] | None = None,
    ) -> AdapterResult:  # fmt: skip
        """Imports an adapter and waits; see stream_import_adapter."""
        with self.stream_import_adapter(path, name=name, token=token, replace=replace) as stream:
            return stream.adapter_result(on_progress)

    def list_adapters(self) -> AdapterListing:
        resp = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return AdapterListing(tuple(_adapter(a) for a in resp.adapters), resp.adapters_dir)

    def get_adapter(self, name: str, *, verify: bool = False) -> StoredAdapter:
        """One adapter; `verify` re-hashes its file (a mismatch raises SdserveError DATA_LOSS)."""
        resp = self._unary(self._stub.GetAdapter, pb.GetAdapterRequest(name=name, verify=verify))
        return _adapter(resp.adapter)

    def delete_adapter(self, name: str) -> StoredAdapter:
        """Removes an adapter; returns it as it was."""
        return _adapter(self._unary(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name)).removed)


class AsyncModelManagerClient:
    """An asyncio client for what a server needs from the sidecar: watch, list, record_use, renew_leases and
    report_alias_failure. Errors are SdserveError, as from ModelManagerClient.

    `timeout` is each unary call's deadline unless the call names its own; `options` are gRPC channel arguments,
    e.g. ("grpc.max_receive_message_length", N), replacing this client's defaults of the same name."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 30.0,
        options: Iterable[tuple[str, Any]] = (),
    ):
        opts = _channel_options(options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.ModelManagerServiceStub(self._channel)
        self._metadata = metadata(api_key)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncModelManagerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=traced(self._metadata)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def watch(self) -> AsyncGenerator[WatchEvent, None]:
        """A Snapshot, then one event per change; raises SdserveError when the stream fails (re-subscribe then).
        Events of a kind this client does not know (sent by a newer sidecar) are skipped."""
        call = self._stub.WatchModels(pb.WatchModelsRequest(), metadata=traced(self._metadata))
        try:
            async for msg in call:
                if msg.WhichOneof("event") is not None:
                    yield watch_event(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def list(self, name: str = "", *, timeout: float | None = None) -> Listing:
        resp = await self._unary(self._stub.ListStoredModels, pb.ListStoredModelsRequest(name=name), timeout)
        return _listing(resp)

    async def list_adapters(self, *, timeout: float | None = None) -> AdapterListing:
        resp = await self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return AdapterListing(tuple(_adapter(a) for a in resp.adapters), resp.adapters_dir)

    async def get_adapter(self, name: str, *, verify: bool = False, timeout: float | None = None) -> StoredAdapter:
        """One adapter; `verify` re-hashes its file (a mismatch raises SdserveError DATA_LOSS)."""
        resp = await self._unary(self._stub.GetAdapter, pb.GetAdapterRequest(name=name, verify=verify), timeout)
        return _adapter(resp.adapter)

    async def record_use(self, name: str, revision: str, variant: str, *, timeout: float | None = None) -> None:
        req = pb.RecordModelUseRequest(name=name, revision=revision, variant=_variant(variant))
        await self._unary(self._stub.RecordModelUse, req, timeout)

    async def renew_leases(
        self,
        holder: str,
        variants: Iterable[tuple[str, str, str]],
        *,
        lease_seconds: int = 0,
        timeout: float | None = None,
    ) -> tuple[tuple[VariantRef, ...], float]:
        """Replaces `holder`'s leases with (name, revision, variant) triples for `lease_seconds` (0: the sidecar's
        default); an empty list releases them. Returns (entries not in the store, when the leases end)."""
        req = _lease_request(holder, variants, lease_seconds)
        resp = await self._unary(self._stub.RenewModelLeases, req, timeout)
        return tuple(_ref(r) for r in resp.unknown), _seconds(resp.expire_time)

    async def report_alias_failure(
        self, alias: str, model: str, revision: str, variant: str, reason: str, *, timeout: float | None = None
    ) -> tuple[Alias, bool]:
        """Tells the sidecar a server could not serve `alias`'s target; returns (the alias now, whether it moved
        back to its previous target)."""
        req = _failure_request(alias, model, revision, variant, reason)
        resp = await self._unary(self._stub.ReportAliasFailure, req, timeout)
        return _alias(resp.alias), resp.reverted
