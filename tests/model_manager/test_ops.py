"""Sidecar operability: metrics on a live scrape (promtool), API keys, TLS and mutual TLS, and a server that
follows a sidecar over TLS with an API key."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from model_manager import metrics as manager_metrics
from model_manager import settings as manager_settings
from sdserve import Client, models_cli
from sdserve.errors import SdserveError
from sdserve.models_client import ModelManagerClient, tls_credentials
from service import settings as server_settings
from tests.certs import make_ca, make_leaf, require_openssl
from tests.harness import serving
from tests.model_manager.harness import TINY_REPO, Sidecar
from tests.model_manager.hubserver import HubServer
from tests.test_hotswap import SwapWatch, served_revision

PROMTOOL = "/usr/bin/promtool"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        assert m, line
        out.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m.group(3))))
    return out


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    return sum(v for n, found, v in samples(text) if n == name and labels.items() <= found.items())


def promtool_check(text: str) -> None:
    """`promtool check metrics` on a scrape; a missing promtool fails the test (it is never skipped)."""
    promtool = shutil.which("promtool") or (PROMTOOL if Path(PROMTOOL).exists() else None)
    if promtool is None:
        pytest.fail(f"{PROMTOOL} is required (Debian package prometheus; scripts/install_test_deps.sh)", pytrace=False)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(SdserveError) as info:
        fn()
    return info.value.code


# ---- metrics --------------------------------------------------------------------------------------------------


def test_metrics_scrape_passes_promtool_and_counts_operations(
    tmp_path: Path, hub: HubServer, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    size = folder_bytes(tiny_root / "tiny-sd")
    budget = int(size * 1.8)  # one tiny model and an fp16 variant fit; two fp32 models do not
    car = sidecars(
        tmp_path / "store",
        hub_url=hub.url,
        import_roots=[tiny_root],
        metrics=True,
        args=["--max-store-bytes", str(budget)],
    )
    assert car.metrics_port > 0
    before = scrape(car.metrics_port)
    assert sample(before, "sdserve_manager_operations_total") == 0
    with car.client() as c:
        c.pull(TINY_REPO)
        assert code_of(lambda: c.pull("sdserve-test/missing")) == "NOT_FOUND"
        # Another commit whose UNet bytes arrive corrupted: it first evicts the pulled model to make room.
        hub.corrupt.add((TINY_REPO, "unet/diffusion_pytorch_model.safetensors"))
        assert code_of(lambda: c.pull(TINY_REPO, revision="v0.1", name="old")) == "DATA_LOSS"
        kept = c.import_model(str(tiny_root / "tiny-sd-old")).model
        c.set_alias("prod", kept.name)
        # Nothing is evictable now (the only model is aliased): the next import does not fit the budget.
        assert code_of(lambda: c.import_model(str(tiny_root / "tiny-inpaint"))) == "RESOURCE_EXHAUSTED"
        c.create_variant(kept.name, "fp16", measure_quality=False)
        listing = c.list()
    text = scrape(car.metrics_port)
    promtool_check(text)

    ops = "sdserve_manager_operations_total"
    assert sample(text, ops, operation="pull", outcome="ok") == 1
    assert sample(text, ops, operation="pull", outcome="not_found") == 1
    assert sample(text, ops, operation="pull", outcome="checksum") == 1
    assert sample(text, ops, operation="import", outcome="ok") == 1
    assert sample(text, ops, operation="import", outcome="budget") == 1
    assert sample(text, ops, operation="create_variant", outcome="ok") == 1
    assert sample(text, ops) == 6
    failures = "sdserve_manager_download_failures_total"
    assert (sample(text, failures, reason="not_found"), sample(text, failures, reason="checksum")) == (1, 1)
    assert sample(text, failures) == 2
    assert sample(text, "sdserve_manager_checksum_failures_total") == 1
    # The first pull's files, plus the second pull's bytes up to the corrupt file.
    assert sample(text, "sdserve_manager_downloaded_bytes_total") >= size
    assert sample(text, "sdserve_manager_evictions_total") == 1
    assert sample(text, "sdserve_manager_evicted_bytes_total") > 0
    assert sample(text, "sdserve_manager_variant_creation_seconds_count", variant="fp16") == 1
    assert sample(text, "sdserve_manager_variant_creation_seconds_count") == 1

    # Scrape-time gauges agree with what the API reports.
    assert sample(text, "sdserve_manager_store_bytes") == listing.usage.used_bytes
    assert sample(text, "sdserve_manager_store_budget_bytes") == budget
    assert sample(text, "sdserve_manager_store_protected_bytes") == listing.usage.protected_bytes > 0
    assert sample(text, "sdserve_manager_disk_free_bytes") > 0
    assert sample(text, "sdserve_manager_min_free_bytes") == 0
    assert sample(text, "sdserve_manager_stored_models", state="ready", variant="fp32") == 1
    assert sample(text, "sdserve_manager_stored_models", state="ready", variant="fp16") == 1
    assert sample(text, "sdserve_manager_stored_models", state="corrupt") == 0
    assert sample(text, "sdserve_manager_aliases") == 1
    assert sample(text, "sdserve_manager_operations_in_flight") == 0
    assert sample(text, "sdserve_manager_watch_streams") == 0
    assert sample(text, "sdserve_manager_process_resident_memory_bytes") > 10_000_000

    # Labels are bounded: fixed sets only, never a repository id, model name or message.
    allowed = {
        "operation": set(manager_metrics.OPERATIONS),
        "outcome": {"ok", *manager_metrics.REASONS},
        "reason": set(manager_metrics.REASONS),
        "variant": set(manager_metrics.VARIANTS),
        "state": set(manager_metrics.STATES),
        "rpc": set(),
        "le": None,
    }
    for name, labels, _ in samples(text):
        assert name.startswith("sdserve_manager_"), name
        for label, value in labels.items():
            assert label in allowed, (name, label)
            values = allowed[label]
            assert values is None or value in values, (name, label, value)


def test_a_watch_stream_shows_in_the_metrics(tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]) -> None:
    car = sidecars(tmp_path / "store", import_roots=[tiny_root], metrics=True)
    with car.client() as c, c.watch() as watch:
        next(iter(watch))  # the snapshot: the stream is open
        assert sample(scrape(car.metrics_port), "sdserve_manager_watch_streams") == 1


# ---- API keys ---------------------------------------------------------------------------------------------------


def test_api_keys(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar], capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops team\nfile-key\n")
    sock = tmp_path / "mm.sock"
    car = sidecars(
        tmp_path / "store",
        import_roots=[tiny_root],
        metrics=True,
        args=["--api-keys", "inline-key", "--api-keys-file", str(keyfile), "--unix-socket", str(sock)],
    )
    refused = 0
    for key in (None, "", "wrong", "inline-keyx"):
        with ModelManagerClient(car.target, api_key=key) as c:
            assert code_of(c.list) == "UNAUTHENTICATED"
            assert code_of(lambda: c.import_model(str(tiny_root / "tiny-sd"))) == "UNAUTHENTICATED"
            assert code_of(lambda: list(c.watch())) == "UNAUTHENTICATED"
            refused += 3
    for key in ("inline-key", "file-key"):
        with ModelManagerClient(car.target, api_key=key) as c:
            assert c.list().models == ()
    # The Unix socket is plaintext, and keys apply there too.
    with ModelManagerClient(f"unix:{sock}") as c:
        assert code_of(c.list) == "UNAUTHENTICATED"
        refused += 1
    with ModelManagerClient(f"unix:{sock}", api_key="file-key") as c:
        assert c.import_model(str(tiny_root / "tiny-sd")).model.state == "ready"

    # Health and reflection stay open.
    with grpc.insecure_channel(car.target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # Watch streams through the edge interceptor too (its handler writes through the context).
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=10))
        services = {s.name for s in answers[0].list_services_response.service}
        assert "sdserve.v1.ModelManagerService" in services

    # The CLI: --api-key, or SDSERVE_MANAGER_API_KEY (read when the parser is built).
    assert models_cli.main(["list", "--manager", car.target, "--api-key", "wrong"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    refused += 1
    assert models_cli.main(["list", "--manager", car.target, "--api-key", "inline-key"]) == 0
    assert "tiny-sd" in capsys.readouterr().out

    text = scrape(car.metrics_port)
    assert sample(text, "sdserve_manager_unauthenticated_calls_total") == refused
    assert sample(text, "sdserve_manager_unauthenticated_calls_total", rpc="WatchModels") == 4
    assert any(r.get("msg") == "serving" and r.get("api_keys") is True for r in car.logs())
    assert not any("inline-key" in line or "file-key" in line for line in car.lines), "keys must never be logged"


def test_cli_reads_the_api_key_from_the_environment(
    tmp_path: Path, sidecars: Callable[..., Sidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    car = sidecars(tmp_path / "store", args=["--api-keys", "env-key"])
    monkeypatch.setenv("SDSERVE_MANAGER_API_KEY", "env-key")
    assert models_cli.main(["list", "--manager", car.target]) == 0
    monkeypatch.delenv("SDSERVE_MANAGER_API_KEY")
    assert models_cli.main(["list", "--manager", car.target]) == 1


# ---- TLS --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, and a client cert from another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def credentials(self, client: bool = True, rogue: bool = False) -> grpc.ChannelCredentials:
        if rogue:
            return tls_credentials(str(self.ca), str(self.rogue_cert), str(self.rogue_key))
        if client:
            return tls_credentials(str(self.ca), str(self.client_cert), str(self.client_key))
        return tls_credentials(str(self.ca))

    def server_args(self, mutual: bool) -> list[str]:
        args = ["--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key)]
        return [*args, "--tls-client-ca-file", str(self.ca)] if mutual else args


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_openssl()
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    other = make_ca(folder, "other-ca")
    server_key, server_cert = make_leaf(folder, "manager", ca, server=True)
    client_key, client_cert = make_leaf(folder, "client", ca, server=False)
    rogue_key, rogue_cert = make_leaf(folder, "rogue", other, server=False)
    return Pki(ca[1], server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


def test_tls_and_mutual_tls(
    tmp_path: Path, pki: Pki, sidecars: Callable[..., Sidecar], capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "mm.sock"
    car = sidecars(tmp_path / "tls", args=[*pki.server_args(mutual=False), "--unix-socket", str(sock)])
    with ModelManagerClient(car.target, credentials=pki.credentials(client=False)) as c:
        assert c.list().models == ()
    with ModelManagerClient(car.target, timeout=10) as c:
        assert code_of(c.list) == "UNAVAILABLE"
    with ModelManagerClient(f"unix:{sock}") as c:
        assert c.list().models == (), "the Unix socket stays plaintext"
    car.stop()

    car = sidecars(tmp_path / "mtls", args=pki.server_args(mutual=True))
    with ModelManagerClient(car.target, credentials=pki.credentials()) as c:
        assert c.list().models == ()
    for creds in (pki.credentials(client=False), pki.credentials(rogue=True)):
        with ModelManagerClient(car.target, credentials=creds, timeout=10) as c:
            assert code_of(c.list) == "UNAVAILABLE"
    tls = ["--tls-ca-file", str(pki.ca), "--tls-cert-file", str(pki.client_cert), "--tls-key-file", str(pki.client_key)]
    assert models_cli.main(["list", "--manager", car.target, *tls]) == 0
    assert "store" in capsys.readouterr().out
    assert any(r.get("msg") == "serving" and r.get("tls") is True and r.get("mtls") is True for r in car.logs())


# ---- the server follows a secured sidecar -----------------------------------------------------------------------


def test_server_follows_a_sidecar_over_mutual_tls_with_an_api_key(
    tmp_path: Path, pki: Pki, tiny_root: Path, models_dir: Path, sidecars: Callable[..., Sidecar]
) -> None:
    car = sidecars(
        tmp_path / "store",
        import_roots=[tiny_root],
        metrics=True,
        args=[*pki.server_args(mutual=True), "--api-keys", "server-key"],
        api_key="server-key",
        credentials=pki.credentials(),
    )
    with car.client() as mc:
        rev_a = mc.import_model(str(tiny_root / "tiny-sd"), name="a").model.revision
        rev_b = mc.import_model(str(tiny_root / "tiny-sd-old"), name="b").model.revision
        mc.set_alias("prod", "a")
    secured = {
        "manager_target": car.target,
        "manager_api_key": "server-key",
        "manager_ca_file": str(pki.ca),
        "manager_client_cert_file": str(pki.client_cert),
        "manager_client_key_file": str(pki.client_key),
    }
    with serving(models_dir, default_model="prod", **secured) as srv:
        assert srv.server is not None and srv.server.watcher.synced.is_set()
        swaps = SwapWatch(srv)
        with Client(srv.target) as c:
            assert served_revision(c) == rev_a
            assert sample(scrape(car.metrics_port), "sdserve_manager_watch_streams") == 1
            with car.client() as mc:
                mc.set_alias("prod", "b")
            assert swaps.wait(1) == [True]
            assert served_revision(c) == rev_b


def test_a_server_with_a_wrong_key_does_not_follow(
    tmp_path: Path, pki: Pki, models_dir: Path, sidecars: Callable[..., Sidecar]
) -> None:
    car = sidecars(tmp_path / "store", metrics=True, args=[*pki.server_args(mutual=False), "--api-keys", "k"])
    wrong = {"manager_target": car.target, "manager_api_key": "not-k", "manager_ca_file": str(pki.ca)}
    with serving(models_dir, manager_wait_seconds=0.1, preload_default=False, **wrong) as srv:
        assert srv.server is not None
        assert car.wait_for_log("call refused: missing or invalid API key")
        assert not srv.server.watcher.synced.is_set()
    refused = [r for r in car.logs() if r.get("msg") == "call refused: missing or invalid API key"]
    assert refused[0]["rpc"] == "/sdserve.v1.ModelManagerService/WatchModels"
    assert sample(scrape(car.metrics_port), "sdserve_manager_unauthenticated_calls_total", rpc="WatchModels") >= 1


# ---- settings ---------------------------------------------------------------------------------------------------


def test_sidecar_security_settings_are_checked() -> None:
    make = manager_settings.Settings.from_sources
    s = make(["--api-keys", "a, b", "--metrics-port", "0", "--metrics-host", "0.0.0.0"], {})
    assert (s.api_keys, s.metrics_port, s.metrics_host) == (("a", "b"), 0, "0.0.0.0")
    assert s.redacted()["api_keys"] == "<set>"
    assert manager_settings.Settings().metrics_port == 9401
    env = {
        "SDSERVE_MANAGER_METRICS_PORT": "-1",
        "SDSERVE_MANAGER_TLS_CERT_FILE": "c",
        "SDSERVE_MANAGER_TLS_KEY_FILE": "k",
    }
    s = make([], env)
    assert (s.metrics_port, s.tls_cert_file, s.tls_key_file) == (-1, "c", "k")
    help_text = manager_settings.build_parser().format_help()
    assert "SDSERVE_MANAGER_API_KEYS; default (none)" in " ".join(help_text.split())
    for bad in (
        ["--tls-cert-file", "c"],
        ["--tls-client-ca-file", "ca"],
        ["--metrics-port", "-2"],
        ["--tls-cert-file", "c", "--tls-key-file", "k", "--port", "-1", "--unix-socket", "/tmp/x.sock"],
    ):
        with pytest.raises(SystemExit):
            make(bad, {})


def test_server_manager_settings_are_checked() -> None:
    make = server_settings.Settings.from_sources
    s = make([], {"SDSERVE_MANAGER_API_KEY": "secret-value", "SDSERVE_MANAGER_CA_FILE": "/ca.pem"})
    assert (s.manager_api_key, s.manager_ca_file) == ("secret-value", "/ca.pem")
    help_text = " ".join(server_settings.build_parser().format_help().split())
    assert "SDSERVE_MANAGER_API_KEY; default (none)" in help_text
    for bad in (
        ["--manager-client-cert-file", "c"],
        ["--manager-target", "unix:/tmp/mm.sock", "--manager-ca-file", "/ca.pem"],
    ):
        with pytest.raises(SystemExit):
            make(bad, {})


def test_environment_names_shared_by_the_two_processes() -> None:
    """The processes read SDSERVE_<NAME> and SDSERVE_MANAGER_<NAME>; no variable may mean something to both."""
    server = {"SDSERVE_" + f.name.upper() for f in dataclasses.fields(server_settings.Settings)}
    sidecar = {manager_settings.PREFIX + f.name.upper() for f in dataclasses.fields(manager_settings.Settings)}
    assert server & sidecar == set()
