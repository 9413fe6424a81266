"""The DiffusionService gRPC servicer: read and validate, submit, stream events, end with the mapped status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service import convert, tracing, validation
from service.accounting import Accounting
from service.adapters import AdapterPool
from service.admission import Admission
from service.batching import BatchPolicy
from service.call_context import CallContext, GrpcCall
from service.device import DeviceChoice
from service.errors import Draining, ServiceError
from service.execution import ProfileBook
from service.jobs import Job
from service.models import ModelRegistry
from service.requests import Failed, GenerationRequest, Outcome, Result, Task
from service.settings import Settings
from service.tracing import Tracing

R = TypeVar("R", pb.GenerateResponse, pb.EditResponse, pb.InpaintResponse)
Reader = Callable[[Any, Settings], GenerationRequest]

_RPC_TASKS = {"Generate": Task.GENERATE, "Edit": Task.EDIT, "Inpaint": Task.INPAINT}
_READERS: dict[str, tuple[Reader, type[Any]]] = {
    "Generate": (validation.generate_request, pb.GenerateResponse),
    "Edit": (validation.edit_request, pb.EditResponse),
    "Inpaint": (validation.inpaint_request, pb.InpaintResponse),
}


def _deadline_passed(context: CallContext, deadline: float | None) -> bool:
    """Whether a call that ended without a result ran out of time rather than being cancelled by the client.
    grpc cancels the handler at the caller's deadline, which is a hair earlier than `deadline` (measured after
    the call arrived), so ask grpc for the time left as well."""
    if deadline is None:
        return False
    remaining = context.time_remaining()
    return time.monotonic() >= deadline - 0.001 or (remaining is not None and remaining <= 0.01)


class _Call:
    """What one generation RPC has got to: its request, job and how it ended (for the access log)."""

    def __init__(self, rpc: str, request: Any, context: CallContext):
        self.rpc = rpc
        self.task = _RPC_TASKS[rpc]
        self.request = request
        self.arrived = time.monotonic()
        remaining = context.time_remaining()
        self.deadline = None if remaining is None or remaining > 1e9 else self.arrived + remaining
        self.outcome = Outcome.INTERNAL
        self.req: GenerationRequest | None = None
        self.job: Job | None = None


class DiffusionServicer(pb_grpc.DiffusionServiceServicer):
    """Serves Generate, Edit and Inpaint streams and the two info RPCs."""

    def __init__(
        self,
        admission: Admission,
        registry: ModelRegistry,
        batching: BatchPolicy,
        choice: DeviceChoice,
        settings: Settings,
        accounting: Accounting,
        adapter_pool: AdapterPool | None = None,
        profiles: ProfileBook | None = None,
        tracing: Tracing | None = None,
    ):
        self._admission = admission
        self._tracing = tracing or Tracing(None)
        self._profiles = profiles
        self._adapter_pool = adapter_pool
        self._registry = registry
        self._batching = batching
        self._choice = choice
        self._settings = settings
        self._replica = convert.replica_name(settings)
        self._accounting = accounting

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for event in self.stream("Generate", request, GrpcCall(context)):
            yield event

    async def Edit(
        self, request: pb.EditRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.EditResponse]:
        async for event in self.stream("Edit", request, GrpcCall(context)):
            yield event

    async def Inpaint(
        self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.InpaintResponse]:
        async for event in self.stream("Inpaint", request, GrpcCall(context)):
            yield event

    def _admit(self, call: _Call, read: Reader) -> Job:
        """Reads, validates and queues the request; raises a ServiceError when it cannot be queued."""
        if self._admission.draining:
            raise Draining()
        call.req = read(call.request, self._settings)
        with self._tracing.admitting():
            return self._admission.submit(call.req, asyncio.get_running_loop(), call.deadline)

    def stream(self, rpc: str, request: Any, context: CallContext) -> AsyncIterator[Any]:
        """The events of one Generate, Edit or Inpaint call (`rpc`) as response messages, whatever the transport;
        an error ends it through `context.fail`."""
        read, cls = _READERS[rpc]
        return self._stream(rpc, request, context, read, cls)

    async def _stream(
        self, rpc: str, request: Any, context: CallContext, read: Reader, cls: type[R]
    ) -> AsyncIterator[R]:
        call = _Call(rpc, request, context)
        failed: Failed | None = None
        try:
            try:
                call.job = self._admit(call, read)
            except ServiceError as exc:
                failed = exc.failed()
            while failed is None and call.job is not None:
                event = await call.job.events.get()
                if isinstance(event, Failed):
                    failed = event
                    break
                if isinstance(event, Result):
                    # Set before the yield: a client that stops reading once it has the result is not a cancel.
                    call.outcome = Outcome.OK
                yield convert.stamp_replica(convert.event_to_proto(event, cls), self._replica)
                if isinstance(event, Result):
                    return
            if failed is not None:
                call.outcome = failed.outcome
                await context.fail(failed)
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: the call ended (client cancel) while this generator was paused at a yield.
            if call.outcome is not Outcome.OK:
                call.outcome = Outcome.DEADLINE if _deadline_passed(context, call.deadline) else Outcome.CANCELLED
            raise
        finally:
            if call.job is not None and not call.job.finished:
                self._admission.cancel(call.job)
            tracing.finished(call.job, call.outcome)
            labels = self._model_labels(request, call.job)
            self._accounting.rpc_finished(
                rpc, call.task, labels, request, call.req, call.job, call.outcome, call.arrived, context.transport
            )

    def _model_labels(self, request: Any, job: Job | None) -> tuple[str, str]:
        """(model, variant) for metrics and logs: the served identity when the request was queued, else the model
        the request named if this server has it (an unknown name is `unknown`, so labels stay bounded)."""
        if job is not None:
            return job.resolved.model, job.resolved.variant
        named = getattr(getattr(request, "params", None), "model", "")
        entry = self._registry.entry_of(named if isinstance(named, str) else "")
        return (entry.name, entry.variant) if entry is not None else ("unknown", "")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return self.model_list()

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        return self.server_info()

    def model_list(self) -> pb.ListModelsResponse:
        """ListModels' answer (the same for every transport)."""
        return convert.model_list(self._registry)

    def server_info(self) -> pb.GetServerInfoResponse:
        """GetServerInfo's answer (the same for every transport)."""
        loaded_in = self._adapter_pool.loaded_in() if self._adapter_pool is not None else {}
        return convert.server_info(
            self._settings,
            self._choice,
            self._registry.default,
            self._batching.limits(),
            self._registry.offloaded(),
            convert.adapter_infos(self._admission.adapters.entries(), loaded_in),
            self._profiles.choices() if self._profiles is not None else (),
        )
