"""Per-caller job state for /sdapi/v1/progress and /sdapi/v1/interrupt.

A caller is its API key (a digest of it) when the server has keys, else its client host: a caller sees and stops
only its own A1111 calls. Everything here runs on the server's event loop, so it needs no lock."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import time
from typing import Any

from sdserve_core.auth import bearer_token

IDLE_STATE: dict[str, Any] = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
    # sdserve's own: whether the job waits in the queue, its place there, and its request id.
    "queued": False,
    "queue_position": None,
    "request_id": "",
}


def caller_of(authorization: str, host: str, keyed: bool) -> str:
    """The caller's identity: a digest of its API key when the server checks keys, else its host."""
    if keyed:
        return "key:" + hashlib.sha256(bearer_token(authorization).encode()).hexdigest()[:32]
    return "host:" + host


@dataclasses.dataclass(eq=False)
class Job:
    """One A1111 call in flight: which iteration runs, the step it reached and its latest preview."""

    caller: str
    kind: str
    job_count: int
    started_at: float = dataclasses.field(default_factory=time.time)
    timestamp: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    job_no: int = 0
    step: int = 0
    steps: int = 0
    queue_position: int | None = None
    request_id: str = ""
    preview: bytes = b""
    interrupted: bool = False
    running: asyncio.Task[Any] | None = None

    def next_iteration(self, k: int) -> None:
        self.job_no, self.step, self.steps, self.queue_position = k, 0, 0, None

    def event(self, kind: str, event: Any) -> None:
        """Takes in one stream event (a Generate/Edit/InpaintResponse's `kind` member)."""
        if kind == "queued":
            self.queue_position = event.position
        elif kind == "started":
            self.queue_position, self.request_id = None, event.request_id
        elif kind == "progress":
            self.step, self.steps = event.step, event.total_steps
            if event.previews:
                self.preview = bytes(event.previews[-1].data)

    def progress(self) -> float:
        """Fraction done, 0 to 1, counting finished iterations and steps of the current one."""
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.job_no + within) / max(1, self.job_count))

    def answer(self, skip_image: bool) -> dict[str, Any]:
        """The /progress answer for this job (A1111's ProgressResponse)."""
        done = self.progress()
        elapsed = time.time() - self.started_at
        eta = elapsed / max(done, 0.01) - elapsed
        state = {
            **IDLE_STATE,
            "interrupted": self.interrupted,
            "job": f"scripts_{self.kind}",
            "job_count": self.job_count,
            "job_timestamp": self.timestamp,
            "job_no": self.job_no,
            "sampling_step": self.step,
            "sampling_steps": self.steps,
            "queued": self.queue_position is not None,
            "queue_position": self.queue_position,
            "request_id": self.request_id,
        }
        image = None if skip_image or not self.preview else base64.b64encode(self.preview).decode("ascii")
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}


class Tracker:
    """The A1111 calls in flight, by caller, oldest first."""

    def __init__(self) -> None:
        self._jobs: dict[str, list[Job]] = {}

    def open(self, caller: str, kind: str, job_count: int) -> Job:
        job = Job(caller, kind, job_count)
        self._jobs.setdefault(caller, []).append(job)
        return job

    def close(self, job: Job) -> None:
        jobs = self._jobs.get(job.caller, [])
        if job in jobs:
            jobs.remove(job)
        if not jobs:
            self._jobs.pop(job.caller, None)

    def progress(self, caller: str, skip_image: bool) -> dict[str, Any]:
        """The caller's oldest call in flight, or A1111's idle answer."""
        jobs = self._jobs.get(caller)
        if not jobs:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": dict(IDLE_STATE),
                "current_image": None,
                "textinfo": None,
            }
        return jobs[0].answer(skip_image)

    def interrupt(self, caller: str) -> int:
        """Stops every call of the caller (its running iteration ends CANCELLED); returns how many."""
        jobs = list(self._jobs.get(caller, []))
        for job in jobs:
            job.interrupted = True
            if job.running is not None:
                job.running.cancel()
        return len(jobs)
