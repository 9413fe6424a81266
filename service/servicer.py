"""The DiffusionService gRPC servicer: validate, submit, stream events, map failures to statuses."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import platform
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from service import convert, status
from service.dispatch import Overloaded
from service.engine import Engine
from service.jobs import Job
from service.metrics import ServerMetrics
from service.models import ModelNotFound, ModelState, ModelUnusable
from service.requests import Failed, GenerationRequest, Outcome, Result, Task
from service.resolve import InvalidForModel
from service.settings import Settings

log = logging.getLogger(__name__)

R = TypeVar("R", pb.GenerateResponse, pb.EditResponse, pb.InpaintResponse)
Parser = Callable[[Any, Settings], GenerationRequest]

_STATE_ENUM = {
    ModelState.ON_DISK: pb.MODEL_STATE_ON_DISK,
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.LOADED: pb.MODEL_STATE_LOADED,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
_RPC_TASKS = {"Generate": Task.GENERATE, "Edit": Task.EDIT, "Inpaint": Task.INPAINT}
_TASK_ENUM = {Task.GENERATE: pb.TASK_GENERATE, Task.EDIT: pb.TASK_EDIT, Task.INPAINT: pb.TASK_INPAINT}
VERSION = "0.1.0"


def _deadline_passed(context: grpc.aio.ServicerContext[Any, Any], deadline: float | None) -> bool:
    """Whether a call that ended without a result ran out of time rather than being cancelled by the client.
    grpc cancels the handler at the caller's deadline, which is a hair earlier than `deadline` (measured after
    the call arrived), so ask grpc for the time left as well."""
    if deadline is None:
        return False
    remaining = context.time_remaining()
    return time.monotonic() >= deadline - 0.001 or (remaining is not None and remaining <= 0.01)


def _raw_request_id(request: Any) -> str:
    """The caller's request id as sent (already validated or not), for log lines of refused requests."""
    rid = getattr(getattr(request, "params", None), "request_id", "")
    return rid if isinstance(rid, str) and len(rid) <= 128 and rid.isprintable() else ""


class DiffusionServicer(pb_grpc.DiffusionServiceServicer):
    """Serves Generate, Edit and Inpaint streams and the two info RPCs."""

    def __init__(self, engine: Engine, settings: Settings, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.draining = False

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for event in self._stream("Generate", request, context, convert.generate_request, pb.GenerateResponse):
            yield event

    async def Edit(
        self, request: pb.EditRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.EditResponse]:
        async for event in self._stream("Edit", request, context, convert.edit_request, pb.EditResponse):
            yield event

    async def Inpaint(
        self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.InpaintResponse]:
        async for event in self._stream("Inpaint", request, context, convert.inpaint_request, pb.InpaintResponse):
            yield event

    def _submit(
        self, req: GenerationRequest, context: grpc.aio.ServicerContext[Any, Any], deadline: float | None
    ) -> Job | Failed:
        try:
            return self.engine.submit(req, asyncio.get_running_loop(), deadline)
        except InvalidForModel as exc:
            return status.invalid(exc.violations)
        except ModelNotFound as exc:
            return Failed(Outcome.NOT_FOUND, f"model {exc.args[0]!r} not found; ListModels shows what is served")
        except ModelUnusable as exc:
            return Failed(Outcome.UNAVAILABLE_MODEL, str(exc))
        except Overloaded as exc:
            return Failed(Outcome.OVERLOADED, f"queue full: {exc}", (), 1.0)

    async def _stream(
        self, rpc: str, request: Any, context: grpc.aio.ServicerContext[Any, Any], parse: Parser, cls: type[R]
    ) -> AsyncIterator[R]:
        arrived = time.monotonic()
        remaining = context.time_remaining()
        deadline = None if remaining is None or remaining > 1e9 else arrived + remaining
        task = _RPC_TASKS[rpc]
        outcome = Outcome.INTERNAL
        req: GenerationRequest | None = None
        job: Job | None = None
        failed: Failed | None = None
        try:
            if self.draining:
                failed = Failed(Outcome.UNAVAILABLE, "the server is draining; retry on another replica")
            else:
                try:
                    req = parse(request, self.settings)
                except convert.InvalidRequest as exc:
                    failed = status.invalid(exc.violations)
            if failed is None and req is not None:
                submitted = self._submit(req, context, deadline)
                if isinstance(submitted, Failed):
                    failed = submitted
                else:
                    job = submitted
            while failed is None and job is not None:
                event = await job.events.get()
                if isinstance(event, Failed):
                    failed = event
                    break
                if isinstance(event, Result):
                    # Set before the yield: a client that stops reading once it has the result is not a cancel.
                    outcome = Outcome.OK
                yield convert.event_to_proto(event, cls)
                if isinstance(event, Result):
                    return
            if failed is not None:
                outcome = failed.outcome
                code, message, metadata = status.rich_status(failed)
                await context.abort(code, message, trailing_metadata=metadata)
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: the call ended (client cancel) while this generator was paused at a yield.
            if outcome is not Outcome.OK:
                outcome = Outcome.DEADLINE if _deadline_passed(context, deadline) else Outcome.CANCELLED
            raise
        finally:
            if job is not None and not job.finished:
                self.engine.cancel(job)
            self._account(rpc, task, request, req, job, outcome, arrived)

    def _model_labels(self, request: Any, job: Job | None) -> tuple[str, str]:
        """(model, variant) for metrics and logs: the served identity when the request was queued, else the model
        the request named if this server has it (an unknown name is `unknown`, so labels stay bounded)."""
        if job is not None:
            return job.resolved.model, job.resolved.variant
        params = getattr(request, "params", None)
        named = getattr(params, "model", "")
        entry = self.engine.registry.entry_of(named if isinstance(named, str) else "")
        return (entry.name, entry.variant) if entry is not None else ("unknown", "")

    def _account(
        self,
        rpc: str,
        task: Task,
        request: Any,
        req: GenerationRequest | None,
        job: Job | None,
        outcome: Outcome,
        arrived: float,
    ) -> None:
        model, variant = self._model_labels(request, job)
        elapsed = time.monotonic() - arrived
        m = self.metrics
        if m is not None:
            m.requests.labels(rpc, model, variant, task.value, outcome.value).inc()
            m.request_seconds.labels(rpc, outcome.value).observe(elapsed)
        fields: dict[str, object] = {
            "rpc": rpc,
            "model": model,
            "variant": variant,
            "outcome": outcome.value,
            "total_seconds": round(elapsed, 4),
            "request_id": _raw_request_id(request) or uuid.uuid4().hex,
        }
        if job is not None:
            r = job.resolved
            fields.update(
                request_id=r.request_id,
                revision=r.model_revision,
                dtype=r.dtype,
                steps=r.steps,
                images=r.num_images,
                width=r.width,
                height=r.height,
                scheduler=r.scheduler_name,
                queue_seconds=round(((job.started_at or time.monotonic()) - job.enqueued_at), 4),
                steps_done=job.steps_done,
            )
        if req is not None:
            fields.update(
                prompt_chars=len(req.prompt),
                prompt_sha256=hashlib.sha256(req.prompt.encode()).hexdigest()[:16],
                negative_chars=len(req.negative_prompt),
            )
        level = logging.ERROR if outcome is Outcome.INTERNAL else logging.INFO
        log.log(level, "request", extra=fields)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        registry = self.engine.registry
        aliases = registry.aliases()
        models = []
        for entry in registry.entries():
            state, error = registry.state(entry.slot)
            names = registry.public_names(entry.slot)
            models.append(
                pb.ModelInfo(
                    name=entry.slot,
                    revision=entry.revision,
                    state=_STATE_ENUM[state],
                    aliases=sorted(
                        [a for a in aliases if registry.slot_of(a) == entry.slot]
                        + [n for n in names if n != entry.name]
                    ),
                    tasks=[_TASK_ENUM[t] for t in entry.tasks],
                    variant=entry.variant,
                    default_width=entry.default_width,
                    default_height=entry.default_height,
                    unet_in_channels=entry.unet_in_channels,
                    error=error,
                    description=entry.description,
                    inpaint_model=entry.inpaint_model,
                )
            )
        return pb.ListModelsResponse(models=models, default_model=registry.default_model)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServerInfoResponse:
        import diffusers
        import torch
        import transformers

        s = self.settings
        choice = self.engine.choice
        return pb.GetServerInfoResponse(
            version=VERSION,
            device=choice.type,
            device_name=choice.name,
            dtype=choice.dtype_name,
            torch_version=torch.__version__,
            diffusers_version=diffusers.__version__,
            transformers_version=transformers.__version__,
            python_version=platform.python_version(),
            schedulers=[convert.scheduler_to_proto(n) for n in self.engine.supported_schedulers()],
            limits=pb.Limits(
                min_size=s.min_size,
                max_size=s.max_size,
                max_input_pixels=s.max_input_pixels,
                max_image_bytes=s.max_image_bytes,
                max_steps=s.max_steps,
                max_images=s.max_images,
                max_prompt_chars=s.max_prompt_chars,
                max_message_bytes=s.max_message_bytes,
                max_queue=s.max_queue,
                default_max_queue_seconds=s.default_max_queue_seconds,
            ),
            default_model=self.engine.registry.default_model,
            batch_limits=[
                pb.BatchLimit(
                    model=b.model,
                    width=b.width,
                    height=b.height,
                    max_batch_images=b.max_images,
                    source=b.source,
                    variant=b.variant,
                )
                for b in self.engine.batching.limits()
            ],
        )
