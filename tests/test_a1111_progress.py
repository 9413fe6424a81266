"""A1111 /progress and /interrupt against a real server: the caller's own job with its live preview, an interrupt
that ends the job CANCELLED while the call answers 200, callers kept apart by API key, a queued job's place, a full
queue (429), and a client that hangs up."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from service.requests import Outcome
from tests.harness import ServerThread, running, wait_ledger
from tests.test_a1111 import call

LONG = {"prompt": "a long one", "steps": 150, "width": 256, "height": 256, "seed": 3}


@pytest.fixture(scope="module")
def keyed(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, http_port=0, api_keys=("alice", "bob", "carol"), max_queue=1)


def progress(srv: ServerThread, key: str, query: str = "") -> dict[str, Any]:
    status, _, body = call(srv, "/sdapi/v1/progress" + query, key=key)
    assert status == 200, body
    return dict(body)


def wait_progress(srv: ServerThread, key: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Polls the caller's progress until `ready` holds (bounded; the state is what is waited on)."""
    deadline = time.monotonic() + 120
    while True:
        seen = progress(srv, key)
        if ready(seen):
            return seen
        assert time.monotonic() < deadline, f"timed out waiting on progress: {seen}"
        time.sleep(0.05)


class Call(threading.Thread):
    """One txt2img call on its own thread; `answer` is (status, headers, body) once it returns."""

    def __init__(self, srv: ServerThread, body: dict[str, Any], key: str):
        super().__init__(daemon=True)
        self.args = (srv, body, key)
        self.answer: tuple[int, dict[str, str], Any] | None = None

    def run(self) -> None:
        srv, body, key = self.args
        self.answer = call(srv, "/sdapi/v1/txt2img", body, key=key)

    def result(self) -> tuple[int, dict[str, str], Any]:
        self.join(120)
        assert self.answer is not None, "the txt2img call did not return"
        return self.answer


def cancelled_count(srv: ServerThread) -> float:
    assert srv.server is not None
    return sum(
        s.value
        for metric in srv.server.metrics.registry.collect()
        for s in metric.samples
        if s.name == "sdserve_requests_total" and s.labels.get("transport") == "a1111"
        if s.labels.get("outcome") == "cancelled"
    )


def test_idle_progress_is_a1111s(keyed: ServerThread) -> None:
    idle = progress(keyed, "alice")
    assert idle["progress"] == 0 and idle["eta_relative"] == 0 and idle["current_image"] is None
    assert idle["state"]["job_count"] == 0 and idle["state"]["sampling_steps"] == 0


def test_progress_preview_and_interrupt_are_the_callers_own(keyed: ServerThread) -> None:
    before = cancelled_count(keyed)
    job = Call(keyed, {**LONG, "force_task_id": "interrupt-me"}, "alice")
    job.start()
    seen = wait_progress(keyed, "alice", lambda p: p["state"]["sampling_step"] >= 1 and bool(p["current_image"]))
    state = seen["state"]
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    assert (state["job"], state["job_count"], state["job_no"]) == ("scripts_txt2img", 1, 0)
    assert (state["sampling_steps"], state["request_id"], state["queued"]) == (150, "interrupt-me", False)
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size[0] > 0
    assert progress(keyed, "alice", "?skip_current_image=true")["current_image"] is None
    # Another caller sees nothing of it and cannot stop it.
    assert progress(keyed, "bob")["state"]["job_count"] == 0
    assert call(keyed, "/sdapi/v1/interrupt", {}, key="bob")[2] == {}
    step = progress(keyed, "alice")["state"]["sampling_step"]
    wait_progress(keyed, "alice", lambda p: p["state"]["sampling_step"] > step + 1)
    # Its own caller stops it: the call answers 200 without images (sdserve skips the last decode).
    assert call(keyed, "/sdapi/v1/interrupt", {}, key="alice")[2] == {}
    status, headers, body = job.result()
    assert status == 200, body
    assert body["images"] == [] and headers["x-sdserve-interrupted"] == "true"
    info = json.loads(body["info"])
    assert info["interrupted"] is True and info["seed"] == 3 and info["sd_model_name"]
    entry = wait_ledger(keyed, "interrupt-me")
    assert entry.outcome is Outcome.CANCELLED and entry.steps_done < 150 and not entry.decoded
    assert cancelled_count(keyed) == before + 1
    assert progress(keyed, "alice")["state"]["job_count"] == 0


def test_a_client_that_hangs_up_cancels_its_job(keyed: ServerThread) -> None:
    assert keyed.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", keyed.server.http_port, timeout=60)
    body = json.dumps({**LONG, "seed": 4, "force_task_id": "hang-up"})
    conn.request("POST", "/sdapi/v1/txt2img", body, {"content-type": "application/json", "authorization": "Bearer bob"})
    wait_progress(keyed, "bob", lambda p: p["state"]["sampling_step"] >= 1)
    conn.close()
    entry = wait_ledger(keyed, "hang-up")
    assert entry.outcome is Outcome.CANCELLED and entry.steps_done < 150
    wait_progress(keyed, "bob", lambda p: p["state"]["job_count"] == 0)


def test_a_queued_job_shows_its_place_and_a_full_queue_is_429(keyed: ServerThread) -> None:
    assert keyed.server is not None
    running_job = Call(keyed, {**LONG, "force_task_id": "runs"}, "alice")
    running_job.start()
    wait_progress(keyed, "alice", lambda p: p["state"]["sampling_step"] >= 1)
    queued_job = Call(keyed, {**LONG, "force_task_id": "waits"}, "bob")
    queued_job.start()
    seen = wait_progress(keyed, "bob", lambda p: p["state"]["queued"] is True)
    assert seen["state"]["queue_position"] == 0 and seen["state"]["sampling_step"] == 0 and seen["progress"] == 0
    status, headers, body = call(keyed, "/sdapi/v1/txt2img", {**LONG, "seed": 9}, key="carol")
    assert status == 429 and int(headers["retry-after"]) >= 1, body
    assert body["error"] == "RESOURCE_EXHAUSTED" and "queue full" in body["detail"]
    for key, job, request_id in (("bob", queued_job, "waits"), ("alice", running_job, "runs")):
        assert call(keyed, "/sdapi/v1/interrupt", {}, key=key)[2] == {}
        assert job.result()[0] == 200
        assert wait_ledger(keyed, request_id).outcome is Outcome.CANCELLED
