"""Operability: metrics on a live scrape (promtool), the request ledger under mixed load, auth and TLS."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdserve import Client, Progress, SdserveError
from tests.certs import make_ca, make_leaf, require_openssl
from tests.harness import ServerThread, running

LONG = {"steps": 150, "width": 256, "height": 256}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        assert m
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@pytest.fixture(scope="module")
def metered(models_dir: Path) -> Iterator[ServerThread]:
    yield from running(models_dir, metrics_port=0, max_queue=3)


def wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    """Polls `predicate` until true (bounded): the server accounts for an RPC just after its status is sent."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_metrics_scrape_passes_promtool(metered: ServerThread) -> None:
    assert metered.server is not None
    port = metered.server.metrics_port
    with Client(metered.target) as c:
        c.generate("x", steps=2)
        with pytest.raises(SdserveError):
            c.generate("x", width=7)
    wait_for(lambda: sample(scrape(port), "sdserve_requests_total", outcome="invalid") >= 1, "invalid counted")
    text = scrape(port)
    for name in (
        "sdserve_requests_total",
        "sdserve_queue_depth",
        "sdserve_in_flight_requests",
        "sdserve_queue_seconds_bucket",
        "sdserve_inference_seconds_bucket",
        "sdserve_step_seconds_bucket",
        "sdserve_first_progress_seconds_bucket",
        "sdserve_request_seconds_bucket",
        "sdserve_images_generated_total",
        "sdserve_batch_images_bucket",
        "sdserve_model_loaded",
        "sdserve_model_load_seconds_bucket",
        "sdserve_process_resident_memory_bytes",
    ):
        assert name in text, name
    assert sample(text, "sdserve_model_loaded", model="tiny-sd") == 1
    assert sample(text, "sdserve_process_resident_memory_bytes") > 10_000_000
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (Debian package prometheus); `make test` installs it"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_ledger_matches_metrics_under_mixed_load(metered: ServerThread) -> None:
    """A bounded mixed load: every request ends exactly once, and the counters agree with what clients saw."""
    assert metered.server is not None
    port = metered.server.metrics_port
    before = scrape(port)
    ledger: dict[str, list[str]] = {}
    lock = threading.Lock()

    def record(name: str, outcome: str) -> None:
        with lock:
            ledger.setdefault(name, []).append(outcome)

    def ok(name: str, client: Client) -> None:
        try:
            client.generate("ok", steps=2, seed=1)
            record(name, "ok")
        except SdserveError as err:
            record(name, err.code)

    def cancel(name: str, client: Client) -> None:
        stream = client.stream_generate("cancel", steps=40)
        try:
            for ev in stream:
                if isinstance(ev, Progress):
                    stream.cancel()
            record(name, "ok")
        except SdserveError as err:
            record(name, err.code)

    def deadline(name: str, client: Client) -> None:
        try:
            client.generate("deadline", timeout=0.3, **LONG)  # type: ignore[arg-type]
            record(name, "ok")
        except SdserveError as err:
            record(name, err.code)

    def invalid(name: str, client: Client) -> None:
        try:
            client.generate("invalid", steps=9999)
            record(name, "ok")
        except SdserveError as err:
            record(name, err.code)

    kinds = [ok, cancel, deadline, invalid, ok, ok, cancel, invalid, ok, deadline, ok, ok, ok, ok, ok, ok]
    with Client(metered.target) as client:
        threads = [threading.Thread(target=k, args=(f"{k.__name__}-{i}", client)) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(ledger) == len(kinds) and all(len(v) == 1 for v in ledger.values()), ledger
    seen = Counter(v[0] for v in ledger.values())
    # The queue holds 3: with 16 concurrent requests some were refused; every kind of ending happened.
    assert seen["INVALID_ARGUMENT"] == 2
    assert seen["RESOURCE_EXHAUSTED"] >= 1, seen
    assert seen["ok"] >= 1, seen
    names = {
        "ok": "ok",
        "INVALID_ARGUMENT": "invalid",
        "RESOURCE_EXHAUSTED": "overloaded",
        "CANCELLED": "cancelled",
        "DEADLINE_EXCEEDED": "deadline",
    }
    assert set(seen) <= set(names), seen

    def delta(outcome: str, text: str) -> float:
        return sample(text, "sdserve_requests_total", outcome=outcome) - sample(
            before, "sdserve_requests_total", outcome=outcome
        )

    wait_for(lambda: sum(delta(o, scrape(port)) for o in names.values()) >= len(kinds), "all requests counted")
    after = scrape(port)
    for code, outcome in names.items():
        assert delta(outcome, after) == seen[code], (outcome, seen)
    wait_for(lambda: sample(scrape(port), "sdserve_in_flight_requests") == 0, "in-flight back to 0")
    assert sample(scrape(port), "sdserve_queue_depth") == 0
    assert metered.server.admission.active_count() == 0


def test_api_keys(models_dir: Path, tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nfile-key\n")
    for srv in running(models_dir, api_keys=("inline-key",), api_keys_file=str(keyfile), metrics_port=0):
        for key in (None, "wrong", "inline-keyx", ""):
            with Client(srv.target, api_key=key) as c, pytest.raises(SdserveError) as info:
                c.generate("x", steps=1)
            assert info.value.code == "UNAUTHENTICATED"
            with Client(srv.target, api_key=key) as c, pytest.raises(SdserveError) as info:
                c.list_models()
            assert info.value.code == "UNAUTHENTICATED"
        for key in ("inline-key", "file-key"):
            with Client(srv.target, api_key=key) as c:
                assert c.generate("x", steps=1).image.width == 64
        # Health stays open without a key.
        with grpc.insecure_channel(srv.target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        assert srv.server is not None
        text = scrape(srv.server.metrics_port)
        assert sample(text, "sdserve_requests_total", outcome="unauthenticated") == 8


def test_tls_and_mutual_tls(models_dir: Path, tmp_path: Path) -> None:
    require_openssl()
    ca = make_ca(tmp_path, "ca")
    other_ca = make_ca(tmp_path, "other-ca")
    server_key, server_cert = make_leaf(tmp_path, "server", ca, server=True)
    client_key, client_cert = make_leaf(tmp_path, "client", ca, server=False)
    rogue_key, rogue_cert = make_leaf(tmp_path, "rogue", other_ca, server=False)
    root = ca[1].read_bytes()

    # Server-side TLS only.
    for srv in running(models_dir, tls_cert_file=str(server_cert), tls_key_file=str(server_key)):
        with Client(srv.target, credentials=grpc.ssl_channel_credentials(root)) as c:
            assert c.generate("x", steps=1).image.width == 64
        with Client(srv.target) as c, pytest.raises(SdserveError) as info:
            c.generate("x", steps=1, timeout=10)
        assert info.value.code == "UNAVAILABLE"

    # Mutual TLS: the client must present a certificate signed by the configured CA.
    for srv in running(
        models_dir, tls_cert_file=str(server_cert), tls_key_file=str(server_key), tls_client_ca_file=str(ca[1])
    ):
        good = grpc.ssl_channel_credentials(root, client_key.read_bytes(), client_cert.read_bytes())
        with Client(srv.target, credentials=good) as c:
            assert c.generate("x", steps=1).image.width == 64
        for creds in (
            grpc.ssl_channel_credentials(root),
            grpc.ssl_channel_credentials(root, rogue_key.read_bytes(), rogue_cert.read_bytes()),
        ):
            with Client(srv.target, credentials=creds) as c, pytest.raises(SdserveError) as info:
                c.generate("x", steps=1, timeout=10)
            assert info.value.code == "UNAVAILABLE"
