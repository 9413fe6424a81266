"""Runs a prepared A1111 request through the servicer's stream, one n_iter iteration at a time, feeding /progress,
and stopping on /interrupt or when the client hangs up (the servicer then ends the job CANCELLED)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from sdserve.v1 import diffusion_pb2 as pb
from service.a1111.errors import A1111Call
from service.a1111.tracking import Job
from service.a1111.translate import Prepared
from service.servicer import DiffusionServicer


class ClientGone(Exception):
    """The HTTP client disconnected; nobody reads the answer."""


@dataclasses.dataclass
class Outcome:
    """What the iterations produced: their results in order, the first Started event, and whether /interrupt
    stopped the call (the iterations left never ran)."""

    results: list[pb.ResultEvent] = dataclasses.field(default_factory=list)
    started: pb.StartedEvent | None = None
    interrupted: bool = False


class Runner:
    """Runs prepared requests on one servicer."""

    def __init__(self, servicer: DiffusionServicer):
        self._servicer = servicer

    async def run(self, prepared: Prepared, job: Job, disconnected: Callable[[], Awaitable[Any]]) -> Outcome:
        """Every iteration in turn. A servicer failure raises A1111Failed; a client that hangs up raises ClientGone
        (the running iteration is cancelled first)."""
        out = Outcome()
        watch = asyncio.ensure_future(disconnected())
        try:
            for k in range(prepared.iterations):
                if job.interrupted:
                    break
                job.next_iteration(k)
                running = asyncio.ensure_future(self._iteration(prepared.rpc, prepared.make(k), job, out))
                job.running = running
                await asyncio.wait({running, watch}, return_when=asyncio.FIRST_COMPLETED)
                job.running = None
                if not running.done():
                    running.cancel()
                    await asyncio.wait({running})
                    raise ClientGone()
                if running.cancelled():
                    break
                out.results.append(running.result())
            out.interrupted = job.interrupted
            return out
        finally:
            watch.cancel()
            if job.running is not None:
                job.running.cancel()

    async def _iteration(self, rpc: str, request: Any, job: Job, out: Outcome) -> pb.ResultEvent:
        """One servicer stream to its result."""
        stream = self._servicer.stream(rpc, request, A1111Call())
        try:
            async for event in stream:
                kind = event.WhichOneof("event")
                member = getattr(event, kind)
                job.event(kind, member)
                if kind == "started" and out.started is None:
                    out.started = member
                elif kind == "result":
                    return member  # type: ignore[no-any-return]
        finally:
            # Close the servicer's generator now, so it accounts for the call at once (as the Connect edge does).
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        raise RuntimeError("the servicer's stream ended without a result")
