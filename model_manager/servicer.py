"""The ModelManagerService gRPC servicer: validate, run operations off the event loop, stream progress and events."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from model_manager import convert, errors, status
from model_manager.adapter_rpc import AdapterRpcs
from model_manager.adapters import AdapterStore
from model_manager.ops import Operations
from model_manager.progress import Progress, Reporter
from model_manager.reconcile import Reconciler
from model_manager.settings import Settings
from model_manager.store import Change, Store
from sdserve.v1 import model_manager_pb2 as pb
from sdserve.v1 import model_manager_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

R = TypeVar(
    "R",
    pb.PullModelResponse,
    pb.ImportModelResponse,
    pb.CreateVariantResponse,
    pb.PullAdapterResponse,
    pb.ImportAdapterResponse,
)
T = TypeVar("T")


class _Done:
    def __init__(self, result: Any, error: BaseException | None):
        self.result = result
        self.error = error


class ModelManagerServicer(AdapterRpcs, pb_grpc.ModelManagerServiceServicer):
    """Thin: every rule lives in Operations, Store and AdapterStore; this maps calls, progress and errors (the adapter
    RPCs are in model_manager.adapter_rpc)."""

    def __init__(self, store: Store, ops: Operations, settings: Settings, adapters: AdapterStore | None = None):
        self.store = store
        self.ops = ops
        self.settings = settings
        self.adapters = adapters if adapters is not None else AdapterStore(ops)
        # The declared state's reconciler (--declared-state), for its status in ListStoredModels and GetStoredModel.
        self.declared: Reconciler | None = None

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, errors.ManagerError):
            code, message, metadata = status.rich_status(exc)
            log.info("call failed", extra={"code": code.name, "error": message})
            await context.abort(code, message, trailing_metadata=metadata)
        log.error("internal error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error in the model manager; see its log")

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            await self._fail(context, exc)
            raise  # pragma: no cover - abort raises

    async def _operation(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        parse: Callable[[], Any],
        run: Callable[[Any, Reporter], Any],
        wrap: Callable[..., R],
        to_pb: Callable[[Any], Any] = convert.result,
    ) -> AsyncIterator[R]:
        try:
            request = parse()
        except errors.ManagerError as exc:
            await self._fail(context, exc)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Progress | _Done] = asyncio.Queue()
        cancel = threading.Event()

        def emit(p: Progress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, p)

        def work() -> None:
            try:
                done = _Done(run(request, Reporter(emit, cancel)), None)
            except BaseException as exc:
                done = _Done(None, exc)
                if isinstance(exc, errors.Cancelled):
                    # Logged after the operation's own cleanup (staging removed, name lock released) has run.
                    log.info("operation cancelled", extra={"operation": wrap.__name__})
            with contextlib.suppress(RuntimeError):  # the server's loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, done)

        # In a copy of this context, so the operation's spans are children of the RPC's (sdserve_core.tracing).
        thread = threading.Thread(
            target=contextvars.copy_context().run, args=(work,), name="model-manager-op", daemon=True
        )
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Progress):
                    yield wrap(progress=convert.progress(item))
                    continue
                if item.error is not None:
                    await self._fail(context, item.error)
                assert item.result is not None
                yield wrap(result=to_pb(item.result))
                return
        finally:
            # The caller went away (or we are done): a running operation stops at its next check and cleans up.
            cancel.set()

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PullModelResponse]:
        async for msg in self._operation(
            context, lambda: convert.pull_request(request), self.ops.pull, pb.PullModelResponse
        ):
            yield msg

    async def ImportModel(
        self, request: pb.ImportModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ImportModelResponse]:
        async for msg in self._operation(
            context, lambda: convert.import_request(request), self.ops.import_model, pb.ImportModelResponse
        ):
            yield msg

    async def CreateVariant(
        self, request: pb.CreateVariantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CreateVariantResponse]:
        async for msg in self._operation(
            context, lambda: convert.variant_request(request), self.ops.create_variant, pb.CreateVariantResponse
        ):
            yield msg

    async def ListStoredModels(
        self, request: pb.ListStoredModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListStoredModelsResponse:
        def run() -> pb.ListStoredModelsResponse:
            name = convert.name_only(request.name, "name", required=False)
            out = convert.list_reply(
                self.store.variants(name), self.store.aliases(), self.store.usage(), self.store.layout
            )
            out.usage.read_only = self.store.read_only
            if self.declared is not None:
                out.declared.CopyFrom(convert.declared_status(self.declared.status()))
            return out

        return await self._call(context, run)

    async def GetStoredModel(
        self, request: pb.GetStoredModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStoredModelResponse:
        def run() -> pb.GetStoredModelResponse:
            name = convert.name_only(request.name, "name")
            views = self.store.variants(name)
            if not views:
                raise errors.NotFound(f"model {name!r} is not in the store")
            rows = [(r, t) for r, t in self.store.aliases() if name in (k.name for k in r.targets())]
            out = convert.get_reply(views, rows, self.store.layout)
            if self.declared is not None:
                # Its model entry, and the declared aliases that point at it now.
                aliases = {f"aliases.{r.name}" for r, _ in rows}
                out.declared.extend(
                    convert.declared_entry(e)
                    for e in self.declared.status().entries
                    if (e.entry.startswith("models[") and e.name == name) or e.entry in aliases
                )
            return out

        return await self._call(context, run)

    async def DeleteStoredModel(
        self, request: pb.DeleteStoredModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteStoredModelResponse:
        def run() -> pb.DeleteStoredModelResponse:
            name, revision, variant = convert.target(request.name, request.revision, request.variant)
            removed = self.store.remove(name, revision, variant)
            return convert.delete_reply(removed)

        return await self._call(context, run)

    async def PinStoredModel(
        self, request: pb.PinStoredModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PinStoredModelResponse:
        def run() -> pb.PinStoredModelResponse:
            name = convert.name_only(request.name, "name")
            views = self.store.pin(name, request.pinned)
            return convert.pin_reply(views)

        return await self._call(context, run)

    async def RecordModelUse(
        self, request: pb.RecordModelUseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RecordModelUseResponse:
        def run() -> pb.RecordModelUseResponse:
            name, revision, variant = convert.target(request.name, request.revision, request.variant)
            self.store.touch(self.store.resolve(name, revision, variant).key)
            return convert.use_reply()

        return await self._call(context, run)

    async def RenewModelLeases(
        self, request: pb.RenewModelLeasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RenewModelLeasesResponse:
        def run() -> pb.RenewModelLeasesResponse:
            holder, keys, seconds = convert.lease_request(request)
            unknown, expires = self.store.renew_leases(holder, keys, seconds)
            return convert.lease_reply(unknown, expires)

        return await self._call(context, run)

    async def ReportAliasFailure(
        self, request: pb.ReportAliasFailureRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReportAliasFailureResponse:
        def run() -> pb.ReportAliasFailureResponse:
            alias, target, reason = convert.failure_report(request)
            log.warning(
                "a server reports that an alias target fails",
                extra={"alias": alias, "target": target.label(), "reason": reason, "peer": context.peer()},
            )
            record, reverted = self.store.report_failure(alias, target, reason)
            present = self.store.get(record.key) is not None
            return convert.failure_reply(record, present, reverted, self.store.layout)

        return await self._call(context, run)

    async def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetAliasResponse:
        def run() -> pb.SetAliasResponse:
            alias, model, revision, variant, split = convert.set_alias_request(request)
            record, previous, _target = self.ops.set_alias(alias, model, revision, variant, split)
            previous_present = previous is not None and self.store.get(previous.key) is not None
            return convert.set_alias_reply(record, previous, previous_present, self.store.layout)

        return await self._call(context, run)

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteAliasResponse:
        def run() -> pb.DeleteAliasResponse:
            record = self.store.delete_alias(convert.name_only(request.alias, "alias"))
            present = self.store.get(record.key) is not None
            return convert.delete_alias_reply(record, present, self.store.layout)

        return await self._call(context, run)

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchModelsResponse]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        limit = self.settings.watch_queue
        state = {"overflowed": False}

        def deliver(change: Change) -> None:
            if state["overflowed"]:
                return
            if queue.qsize() >= limit:
                state["overflowed"] = True
                queue.put_nowait(None)
                return
            queue.put_nowait(change)

        def listener(change: Change) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(deliver, change)

        # Read while the call is live: once the caller has gone, gRPC may have freed the call that peer() reads
        # (reading it in the `finally` below crashed the process with SIGSEGV).
        peer = context.peer()
        snapshot = self.store.subscribe(listener)
        layout = self.store.layout
        log.info("watcher subscribed", extra={"peer": peer, "sequence": snapshot.sequence})
        try:
            with self.ops.metrics.watching():
                yield convert.snapshot(snapshot, layout)
                while True:
                    item = await queue.get()
                    if item is None:
                        await context.abort(
                            grpc.StatusCode.ABORTED, f"the watcher fell {limit} events behind; subscribe again"
                        )
                        return
                    yield convert.change(item, layout)
        finally:
            self.store.unsubscribe(listener)
            log.info("watcher left", extra={"peer": peer})
