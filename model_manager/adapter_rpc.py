"""The adapter RPCs of ModelManagerService (PullAdapter, ImportAdapter, ListAdapters, GetAdapter, DeleteAdapter):
requests to validated dataclasses, stored adapters to messages; mixed into ModelManagerServicer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from model_manager import convert
from model_manager.adapters import (
    AdapterImport,
    AdapterPull,
    AdapterResult,
    AdapterStore,
    StoredAdapter,
    check_import,
    check_pull,
)
from model_manager.progress import Reporter
from sdserve.v1 import diffusion_pb2 as dpb
from sdserve.v1 import model_manager_pb2 as pb
from sdserve_core import adapter_file as af

_KIND = {af.LORA: dpb.ADAPTER_KIND_LORA, af.TEXTUAL_INVERSION: dpb.ADAPTER_KIND_TEXTUAL_INVERSION}
T = TypeVar("T")


def stored_adapter(a: StoredAdapter) -> pb.StoredAdapter:
    m, f = a.manifest, a.manifest.file
    return pb.StoredAdapter(
        name=m.name,
        kind=_KIND.get(f.kind, dpb.ADAPTER_KIND_UNSPECIFIED),
        layout=f.layout,
        family=f.family,
        base=f.base,
        targets=list(f.targets),
        token=f.token,
        sha256=m.sha256,
        size_bytes=f.size_bytes,
        source=m.source,
        path=str(a.path),
        error=a.error,
        created_time=convert.timestamp(a.created_at),
    )


def adapter_result(r: AdapterResult) -> pb.AdapterOperationResult:
    return pb.AdapterOperationResult(
        adapter=stored_adapter(r.adapter),
        already_present=r.already_present,
        replaced=r.replaced,
        downloaded_bytes=r.downloaded_bytes,
        resumed_bytes=r.resumed_bytes,
    )


def import_request(msg: pb.ImportAdapterRequest) -> AdapterImport:
    return check_import(AdapterImport(msg.path, msg.name, msg.token, msg.replace))


def pull_request(msg: pb.PullAdapterRequest) -> AdapterPull:
    return check_pull(AdapterPull(msg.repo_id, msg.revision, msg.filename, msg.name, msg.token, msg.replace))


class AdapterRpcs:
    """The adapter methods of the servicer; the servicer provides `adapters`, `_call` and `_operation`."""

    adapters: AdapterStore
    _call: Callable[..., Any]
    _operation: Callable[..., AsyncIterator[Any]]

    async def PullAdapter(
        self, request: pb.PullAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.PullAdapterResponse]:
        run: Callable[[AdapterPull, Reporter], AdapterResult] = self.adapters.pull_adapter
        async for msg in self._operation(
            context, lambda: pull_request(request), run, pb.PullAdapterResponse, adapter_result
        ):
            yield msg

    async def ImportAdapter(
        self, request: pb.ImportAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ImportAdapterResponse]:
        run: Callable[[AdapterImport, Reporter], AdapterResult] = self.adapters.import_adapter
        async for msg in self._operation(
            context, lambda: import_request(request), run, pb.ImportAdapterResponse, adapter_result
        ):
            yield msg

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAdaptersResponse:
        def run() -> pb.ListAdaptersResponse:
            return pb.ListAdaptersResponse(
                adapters=[stored_adapter(a) for a in self.adapters.entries()],
                adapters_dir=str(self.adapters.layout.adapters),
            )

        reply: pb.ListAdaptersResponse = await self._call(context, run)
        return reply

    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAdapterResponse:
        def run() -> pb.GetAdapterResponse:
            name = convert.name_only(request.name, "name")
            if request.verify:
                return pb.GetAdapterResponse(adapter=stored_adapter(self.adapters.verify(name)), verified=True)
            return pb.GetAdapterResponse(adapter=stored_adapter(self.adapters.get(name)))

        reply: pb.GetAdapterResponse = await self._call(context, run)
        return reply

    async def DeleteAdapter(
        self, request: pb.DeleteAdapterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteAdapterResponse:
        def run() -> pb.DeleteAdapterResponse:
            name = convert.name_only(request.name, "name")
            return pb.DeleteAdapterResponse(removed=stored_adapter(self.adapters.delete(name)))

        reply: pb.DeleteAdapterResponse = await self._call(context, run)
        return reply
