"""A DiffusionService on port 0 whose streams follow a script (fail after `started`, after the result, at once), so the
client's retry helper meets each failure exactly; it records what every attempt sent."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sdserve.fleet import SERVICE
from sdserve.v1 import diffusion_pb2 as pb


@dataclasses.dataclass(frozen=True)
class Step:
    """One attempt: the events to send (of queued, started, result) on `replica`, then how the stream ends (an OK
    status, or `code` with `message` and, if set, a retry hint in seconds)."""

    events: Sequence[str]
    replica: str = "scripted"
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    retry_after: float | None = None


class ScriptedDiffusion:
    """Generate plays the next Step of the script for each attempt; `seen` holds each attempt's (request id, seed)."""

    def __init__(self, script: Sequence[Step]):
        self.script = list(script)
        self.seen: list[tuple[str, int | None]] = []
        self.lock = threading.Lock()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        p = request.params
        with self.lock:
            step = self.script[len(self.seen)]
            self.seen.append((p.request_id, p.seed if p.HasField("seed") else None))
        for kind in step.events:
            yield _event(kind, p, step.replica)
        if step.code is not grpc.StatusCode.OK:
            context.abort_with_status(_status(step))


def _event(kind: str, p: pb.GenerationParams, replica: str) -> pb.GenerateResponse:
    if kind == "queued":
        return pb.GenerateResponse(queued=pb.QueuedEvent(position=0))
    if kind == "started":
        return pb.GenerateResponse(
            started=pb.StartedEvent(seeds=[p.seed], model="m", request_id=p.request_id, replica=replica)
        )
    image = pb.Image(index=0, data=b"png", width=8, height=8, seed=p.seed)
    params = pb.ResolvedParameters(model="m", replica=replica)
    return pb.GenerateResponse(result=pb.ResultEvent(images=[image], parameters=params, request_id=p.request_id))


def _status(step: Step) -> Any:
    status = status_pb2.Status(code=getattr(code_pb2, step.code.name), message=step.message)
    if step.retry_after is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(step.retry_after)))
        status.details.add().Pack(info)
    return rpc_status.to_status(status)


@contextlib.contextmanager
def scripted(*script: Step) -> Iterator[tuple[str, ScriptedDiffusion]]:
    """A server on 127.0.0.1 playing `script` for the block: (its target, the servicer)."""
    servicer = ScriptedDiffusion(script)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    generate = grpc.unary_stream_rpc_method_handler(
        servicer.Generate,
        request_deserializer=pb.GenerateRequest.FromString,
        response_serializer=pb.GenerateResponse.SerializeToString,
    )
    # Only Generate: every other method answers UNIMPLEMENTED.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Generate": generate}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)
