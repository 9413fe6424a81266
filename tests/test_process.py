"""The server as a real process: graceful drain on SIGTERM, JSON logs, and device out-of-memory."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image

from sdserve import Client, Progress, Result, SdserveError
from tests.harness import png
from tests.procs import ServiceProcess


@pytest.fixture()
def proc_factory(models_dir: Path, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    made: list[ServiceProcess] = []
    yield made
    for p in made:
        p.close()


def start(
    made: list[ServiceProcess], models_dir: Path, workdir: Path, *flags: str, wrapper: tuple[str, ...] = ()
) -> ServiceProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    p = ServiceProcess(models_dir, workdir, *flags, wrapper=wrapper)
    made.append(p)
    p.wait_ready()
    return p


def run_streams(target: str, n: int, steps: int) -> tuple[list[object], list[threading.Event], list[threading.Thread]]:
    """Starts n streams in threads; each sets its event at its first progress. Results land in `outcomes`."""
    outcomes: list[object] = [None] * n
    progressed = [threading.Event() for _ in range(n)]

    def run(i: int) -> None:
        with Client(target) as c:
            try:
                for ev in c.stream_generate(f"stream {i}", steps=steps, width=128, height=128, seed=i):
                    if isinstance(ev, Progress):
                        progressed[i].set()
                    if isinstance(ev, Result):
                        outcomes[i] = ev
            except SdserveError as err:
                outcomes[i] = err
                progressed[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return outcomes, progressed, threads


def test_sigterm_drains_in_flight_streams(proc_factory: list[ServiceProcess], models_dir: Path, tmp_path: Path) -> None:
    p = start(proc_factory, models_dir, tmp_path / "a", "--grace-seconds", "120")
    outcomes, progressed, threads = run_streams(p.target, 2, steps=40)
    assert progressed[0].wait(180)  # the first is running; the second is queued or running
    p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while p.health() == "SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Draining: new calls are refused with UNAVAILABLE while the old ones go on.
    with Client(p.target) as c, pytest.raises(SdserveError) as info:
        c.generate("late", steps=1)
    assert info.value.code == "UNAVAILABLE"
    assert "draining" in info.value.message
    assert p.health("liveness") == "SERVING"
    for t in threads:
        t.join(120)
    assert all(isinstance(o, Result) for o in outcomes), outcomes
    assert p.proc.wait(60) == 0
    messages = [json.loads(line)["msg"] for line in p.log_lines() if line.startswith("{")]
    assert messages[-2:] == ["draining", "stopped"] or "stopped" in messages


def test_grace_end_cuts_off_with_clear_status(
    proc_factory: list[ServiceProcess], models_dir: Path, tmp_path: Path
) -> None:
    p = start(proc_factory, models_dir, tmp_path / "b", "--grace-seconds", "0.2")
    outcomes, progressed, threads = run_streams(p.target, 1, steps=150)
    assert progressed[0].wait(60)
    p.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    err = outcomes[0]
    assert isinstance(err, SdserveError) and err.code == "UNAVAILABLE"
    assert "shut down before this request finished" in err.message
    assert p.proc.wait(60) == 0


def test_second_sigterm_cuts_the_drain_short(
    proc_factory: list[ServiceProcess], models_dir: Path, tmp_path: Path
) -> None:
    p = start(proc_factory, models_dir, tmp_path / "c", "--grace-seconds", "600")
    outcomes, progressed, threads = run_streams(p.target, 1, steps=150)
    assert progressed[0].wait(60)
    p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while p.health() == "SERVING":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert isinstance(outcomes[0], SdserveError) and outcomes[0].code == "UNAVAILABLE"
    assert p.proc.wait(60) == 0


def test_json_logs_never_carry_the_prompt(proc_factory: list[ServiceProcess], models_dir: Path, tmp_path: Path) -> None:
    p = start(proc_factory, models_dir, tmp_path / "d")
    secret = "a very secret prompt 12345"
    with Client(p.target) as c:
        c.generate(secret, steps=1, request_id="log-check")
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(60) == 0
    lines = p.log_lines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) >= 4 and all("msg" in r and "level" in r for r in records)
    request = next(r for r in records if r.get("request_id") == "log-check")
    assert request["rpc"] == "Generate" and request["outcome"] == "ok" and request["prompt_chars"] == len(secret)
    assert len(request["prompt_sha256"]) == 16 and "total_seconds" in request
    assert all(secret not in line for line in lines)


def test_device_out_of_memory_is_resource_exhausted_and_recovers(
    proc_factory: list[ServiceProcess], models_dir: Path, tmp_path: Path
) -> None:
    """A CPU allocation failure (address-space limit) is the CPU's out-of-memory: reported, then recovered."""
    probe = start(proc_factory, models_dir, tmp_path / "probe")
    vms = psutil.Process(probe.proc.pid).memory_info().vms
    probe.close()
    # Room for normal requests (tens of MB) but not for encoding 4 images of 2048x2048 (GBs of activations),
    # which is the first thing an Edit does, so the failure comes fast.
    limit = vms + 700_000_000
    # prlimit (util-linux) applies the address-space limit to the server process only.
    # Tiling and slicing off: with them (auto tiles 2048x2048) the encode would fit in the limit, tile by tile
    # (tests/test_memory.py); this test is about a request that does not fit.
    memory = ("--vae-tiling", "off", "--vae-slicing", "off")
    p = start(proc_factory, models_dir, tmp_path / "e", *memory, wrapper=("prlimit", f"--as={limit}"))
    with Client(p.target) as c:
        with pytest.raises(SdserveError) as info:
            c.edit(png(Image.new("RGB", (2048, 2048), "red")), "huge", steps=1, strength=1.0, num_images=4)
        assert info.value.code == "RESOURCE_EXHAUSTED"
        assert "out of device memory" in info.value.message
        assert c.generate("small", steps=2).image.width == 64
