"""Declared state through a real sidecar: schema errors, reconcile at start, a ConfigMap-style change, broken entries,
no-op re-reads, metrics, and health waiting for the declared `default` alias."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file

from model_manager.adapters import AdapterStore
from model_manager.declared import DeclaredStateError, parse
from model_manager.hub import Hub
from model_manager.layout import StoreLayout
from model_manager.metrics import REASONS, RECONCILE_KINDS, RECONCILE_RESULTS
from model_manager.ops import Operations
from model_manager.reconcile import Reconciler
from model_manager.settings import Settings
from model_manager.store import Store
from sdserve.models_client import Alias
from tests.harness import wait_until
from tests.model_manager.harness import TINY_REPO, Sidecar
from tests.model_manager.hubserver import HubServer, Stall

KEY = "declared.yaml"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ConfigMapVolume:
    """A folder laid out as kubelet lays out a ConfigMap volume, updated as kubelet updates it: the data goes into a
    new `..<timestamp>` folder, a temporary `..data_tmp` link to it is renamed over `..data`, and the key's own link
    (`declared.yaml -> ..data/declared.yaml`) never changes."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True)
        self.version = 0

    @property
    def path(self) -> Path:
        return self.root / KEY

    def write(self, text: str) -> None:
        self.version += 1
        folder = self.root / f"..2026_01_01_00_00_{self.version:02d}.000000001"
        folder.mkdir()
        (folder / KEY).write_text(text)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(folder.name, tmp)
        os.replace(tmp, data)
        if not self.path.is_symlink():
            os.symlink(f"..data/{KEY}", self.path)
        if old is not None:
            for f in (self.root / old).iterdir():
                f.unlink()
            (self.root / old).rmdir()


def _yaml(models: list[dict[str, Any]], aliases: dict[str, str], adapters: list[dict[str, Any]] | None = None) -> str:
    # JSON is YAML: what the file says stays visible in the test.
    return json.dumps({"version": 1, "models": models, "adapters": adapters or [], "aliases": aliases}, indent=2)


def _hub(name: str, repo: str = TINY_REPO, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": {"hub": {"repo": repo, "revision": "main"}}, **extra}


def _local(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": {"local": {"path": str(path)}}, **extra}


@pytest.fixture()
def volume(tmp_path: Path) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path / "declared")


@pytest.fixture()
def start(
    tmp_path: Path, hub: HubServer, tiny_root: Path, sidecars: Callable[..., Sidecar], volume: ConfigMapVolume
) -> Iterator[Callable[..., Sidecar]]:
    def run(*roots: Path) -> Sidecar:
        args = ["--declared-state", str(volume.path), "--declared-poll-seconds", "0.1", "--quality-check", "false"]
        return sidecars(tmp_path / "store", hub_url=hub.url, import_roots=[tiny_root, *roots], args=args, metrics=True)

    yield run


def health(sidecar: Sidecar, service: str = "") -> int:
    with grpc.insecure_channel(sidecar.target) as ch:
        return int(
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        )


def metrics(sidecar: Sidecar) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    return metrics(sidecar).get((name, tuple(sorted(labels.items()))), 0.0)


def operations(sidecar: Sidecar) -> float:
    return sum(v for (name, _), v in metrics(sidecar).items() if name == "sdserve_manager_operations_total")


def passes(sidecar: Sidecar) -> list[dict[str, object]]:
    return [r for r in sidecar.logs() if str(r.get("msg", "")).startswith("declared state reconciled")]


def entries(sidecar: Sidecar, after: int = 0) -> dict[str, dict[str, object]]:
    """The last `declared entry` log line of each entry, from the (after+1)-th pass on."""
    out: dict[str, dict[str, object]] = {}
    seen = 0
    for r in sidecar.logs():
        if str(r.get("msg", "")).startswith("declared state reconciled"):
            seen += 1
        elif r.get("msg") == "declared entry" and seen >= after:
            out[str(r["entry"])] = r
    return out


def aliases(sidecar: Sidecar) -> dict[str, Alias]:
    with sidecar.client() as c:
        return {a.name: a for a in c.list().aliases}


# ---- the schema ------------------------------------------------------------------------------------------------


def test_schema_errors_name_the_entry_and_the_field() -> None:
    text = _yaml(
        [
            _hub("good"),
            _local("relative", Path("imports/x")),
            {"name": "c", "source": {"hub": {"repo": "org/c", "revision": 1234567}}, "variants": ["fp32", "fp16"]},
            {"name": "d", "source": {"hub": {"repo": "org/d"}, "local": {"path": "/x"}}, "pin": "yes", "colour": 1},
            _hub("good", repo="org/other"),
        ],
        {"default": "nope", "good": "good", "prod": "good:int8"},
        [{"name": "ad", "source": {"hub": {"repo": "../up"}}}],
    )
    with pytest.raises(DeclaredStateError) as err:
        parse(text)
    problems = err.value.problems
    expected = {
        "models[1].source.local.path: must be an absolute path",
        "models[2].source.hub.revision: must be a string",
        "models[2].variants[0]: must be one of fp16, bf16, int8",
        "models[3].source: must have exactly one of hub or local",
        "models[3].pin: must be true or false",
        "models[3].colour: unknown field",
        "models[4].name: 'good' is already declared by models[0]",
        "adapters[0].source.hub.repo: must be 'owner/name'",
        "aliases.default: 'nope' is not a model declared in this file",
        "aliases.good: 'good' is a declared model name",
        "aliases.prod: good has no int8 variant here",
    }
    for start in expected:
        assert any(p.startswith(start) for p in problems), f"no problem starts with {start!r}: {problems}"
    assert len(problems) == len(expected), problems
    assert str(err.value).startswith("invalid declared state: models[1]")
    with pytest.raises(DeclaredStateError, match=r"not valid YAML at line 2"):
        parse("version: 1\nmodels: a: b\n")
    with pytest.raises(DeclaredStateError, match=r"\(file\): must be a mapping"):
        parse("- a list\n")
    assert parse("").models == ()


# ---- through a sidecar -----------------------------------------------------------------------------------------


def test_start_reconciles_and_health_waits_for_the_default_alias(
    start: Callable[..., Sidecar], volume: ConfigMapVolume, hub: HubServer, tiny_root: Path, tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    save_file({"<cat>": torch.randn(2, 32)}, adapters / "cat.safetensors")
    volume.write(
        _yaml(
            [_hub("tiny", variants=["fp16"], pin=True), _local("old", tiny_root / "tiny-sd-old")],
            {"default": "tiny:fp16", "prod": "old"},
            [{"name": "cat", "source": {"local": {"path": str(adapters / "cat.safetensors")}}}],
        )
    )
    # The download of the declared default model stalls: the sidecar serves RPCs, but is not ready.
    stall = Stall("unet/diffusion_pytorch_model.safetensors", 1024)
    hub.stalls.append(stall)
    side = start(adapters)
    assert stall.reached.wait(60)
    assert health(side) == NOT_SERVING
    assert health(side, "sdserve.v1.ModelManagerService") == NOT_SERVING
    assert health(side, "liveness") == SERVING
    assert metric(side, "sdserve_manager_reconcile_pending_models") == 2
    stall.release.set()
    wait_until(lambda: health(side) == SERVING, "the default alias to become ready")
    wait_until(lambda: len(passes(side)) == 1, "the first pass to end")

    commit = hub.repos[TINY_REPO].refs["main"]
    found = aliases(side)
    assert (found["default"].model, found["default"].revision, found["default"].variant) == ("tiny", commit, "fp16")
    assert (found["prod"].model, found["prod"].variant) == ("old", "fp32")
    with side.client() as c:
        assert {(m.variant, m.pinned) for m in c.list("tiny").models} == {("fp32", True), ("fp16", True)}
        assert {m.pinned for m in c.list("old").models} == {False}
        assert [a.name for a in c.list_adapters().adapters] == ["cat"]
    # One line per entry, each with its state.
    logged = entries(side)
    assert set(logged) == {"models[0]", "models[1]", "adapters[0]", "aliases.default", "aliases.prod"}
    assert {r["state"] for r in logged.values()} == {"ready"}
    assert logged["aliases.default"]["detail"] == f"tiny@{commit[:12]}:fp16"
    assert metric(side, "sdserve_manager_reconcile_pending_models") == 0
    assert metric(side, "sdserve_manager_reconcile_failed_entries") == 0
    assert metric(side, "sdserve_manager_reconcile_last_success_timestamp_seconds") > 0
    assert metric(side, "sdserve_manager_reconcile_passes_total", result="converged") == 1
    applied = [k for k in metrics(side) if k[0] == "sdserve_manager_declared_state_applied"]
    assert len(applied) == 1


def test_a_changed_file_moves_an_alias_and_unchanged_content_is_a_no_op(
    start: Callable[..., Sidecar], volume: ConfigMapVolume, hub: HubServer, tiny_root: Path
) -> None:
    models = [_hub("tiny"), _local("old", tiny_root / "tiny-sd-old")]
    volume.write(_yaml(models, {"default": "tiny", "prod": "tiny"}))
    side = start()
    wait_until(lambda: len(passes(side)) == 1, "the first pass to end", timeout=120)
    assert aliases(side)["default"].model == "tiny"
    assert health(side) == SERVING
    ops, requests = operations(side), len(hub.requests)

    # A kubectl apply of the ConfigMap: kubelet swaps ..data; the sidecar picks it up and moves only the alias.
    volume.write(_yaml(models, {"default": "old", "prod": "tiny"}))
    wait_until(lambda: len(passes(side)) == 2, "the second pass to end")
    found = aliases(side)
    assert (found["default"].model, found["prod"].model) == ("old", "tiny")
    assert operations(side) == ops, "models already stored are not pulled or imported again"
    assert len(hub.requests) == requests
    assert metric(side, "sdserve_manager_reconcile_passes_total", result="converged") == 2

    # The same content again (a new ..data folder, a new inode and mtime): nothing runs.
    volume.write(_yaml(models, {"default": "old", "prod": "tiny"}))
    assert side.wait_for_log("declared state file changed; its content did not")
    assert len(passes(side)) == 2
    assert operations(side) == ops and len(hub.requests) == requests
    assert aliases(side)["default"].updated_at == found["default"].updated_at


def test_a_broken_entry_moves_no_alias_and_blocks_no_other_entry(
    start: Callable[..., Sidecar], volume: ConfigMapVolume, tiny_root: Path
) -> None:
    base = [_hub("tiny"), _local("old", tiny_root / "tiny-sd-old")]
    volume.write(_yaml(base, {"default": "tiny", "prod": "old"}))
    side = start()
    wait_until(lambda: len(passes(side)) == 1, "the first pass to end", timeout=120)

    broken = [
        *base,
        _hub("missing", repo="sdserve-test/missing"),
        _local("gone", tiny_root / "does-not-exist"),
        _local("inpaint", tiny_root / "tiny-inpaint"),
    ]
    volume.write(_yaml(broken, {"default": "inpaint", "prod": "missing", "canary": "gone"}))
    wait_until(lambda: len(passes(side)) == 2, "the second pass to end", timeout=120)
    found = aliases(side)
    assert found["default"].model == "inpaint", "an entry after the broken ones still reconciles"
    assert found["prod"].model == "old", "an alias whose target failed stays where it was"
    assert "canary" not in found
    assert health(side) == SERVING
    logged = entries(side, after=1)
    states = {e: (r["state"], str(r["reason"])) for e, r in logged.items()}
    assert states["models[0]"] == states["models[1]"] == states["models[4]"] == ("ready", "")
    assert states["aliases.default"] == ("ready", "")
    assert states["models[2]"][0] == "failed" and "sdserve-test/missing" in states["models[2]"][1]
    assert states["models[3]"][0] == "failed" and "does not exist" in states["models[3]"][1]
    assert states["aliases.prod"][0] == "failed" and "the alias stays" in states["aliases.prod"][1]
    assert states["aliases.canary"][0] == "failed"
    assert passes(side)[-1]["failed"] == "models[2], models[3], aliases.prod, aliases.canary"
    assert metric(side, "sdserve_manager_reconcile_failed_entries") == 4
    assert metric(side, "sdserve_manager_reconcile_pending_models") == 2
    assert metric(side, "sdserve_manager_reconcile_errors_total", kind="model", reason="not_found") == 1
    assert metric(side, "sdserve_manager_reconcile_errors_total", kind="model", reason="invalid") == 1
    assert metric(side, "sdserve_manager_reconcile_passes_total", result="failed") == 1
    bounded = {"kind": RECONCILE_KINDS, "reason": REASONS, "result": RECONCILE_RESULTS}
    for name, labels in metrics(side):
        if name.startswith("sdserve_manager_reconcile_"):
            assert all(value in bounded[label] for label, value in labels), (name, labels)

    # A file that does not parse changes nothing, and says why.
    volume.write("version: 1\nmodels: a: b\n")
    assert side.wait_for_log("declared state file not applied; the last applied state stays")
    record = next(
        r for r in side.logs() if r.get("msg") == "declared state file not applied; the last applied state stays"
    )
    assert "not valid YAML at line 2" in str(record["error"])
    assert metric(side, "sdserve_manager_reconcile_errors_total", kind="file", reason="invalid") == 1
    assert aliases(side)["default"].model == "inpaint"


# ---- in process: status() and retries --------------------------------------------------------------------------


@pytest.fixture()
def reconciler(
    tmp_path: Path, hub: HubServer, tiny_root: Path, volume: ConfigMapVolume, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Reconciler]:
    """A reconciler on a real store, hub client and operations, polled by the test itself (no event loop).
    tests/conftest.py sets HF_HUB_OFFLINE for the processes tests start; a pytest-xdist worker inherits it before
    huggingface_hub is imported, which then refuses every request. This in-process sidecar talks to the local Hub
    server, as a sidecar started with --offline false does."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    settings = Settings(
        store=tmp_path / "store", hf_endpoint=hub.url, import_roots=(tiny_root,), quality_check=False, min_free_bytes=0
    )
    layout = StoreLayout(settings.store)
    store = Store(layout, min_free_bytes=0)
    store.open()
    hub_client = Hub(settings.hf_endpoint, "", 5.0, False, layout.downloads)
    ops = Operations(settings, store, hub_client)
    yield Reconciler(volume.path, ops, AdapterStore(ops), poll_seconds=0.1, retry_seconds=0.01)
    store.close()


def test_status_reports_each_entry_and_failed_entries_are_retried(
    reconciler: Reconciler, volume: ConfigMapVolume, hub: HubServer, repo_files: dict[str, dict[str, bytes]]
) -> None:
    assert not reconciler.poll(), "no file yet: nothing to apply"
    assert "cannot read" in reconciler.status().file_error
    assert not reconciler.ready(), "not ready before a declared state was read"
    volume.write(_yaml([_hub("tiny"), _hub("later", repo="sdserve-test/later")], {"default": "tiny", "prod": "later"}))
    assert reconciler.poll()
    status = reconciler.status()
    assert status.file_error == "" and not status.running and not status.converged
    by_entry = {e.entry: e for e in status.entries}
    assert [e.entry for e in status.entries] == ["models[0]", "models[1]", "aliases.default", "aliases.prod"]
    assert by_entry["models[0]"].state == "ready" and by_entry["models[0]"].detail.startswith("tiny@"), by_entry[
        "models[0]"
    ]
    assert by_entry["models[1]"].state == "failed" and "sdserve-test/later" in by_entry["models[1]"].reason
    assert by_entry["aliases.prod"].state == "failed"
    assert reconciler.ready(), "the declared default points at a ready model"
    # The repository appears on the Hub: the next retry pulls it and moves the alias, with the file unchanged.
    hub.repo("sdserve-test/later").add_commit(repo_files["old"])
    wait_until(reconciler.poll, "a retry pass")
    status = reconciler.status()
    assert status.converged and status.last_success_at >= status.last_pass_at > 0
    assert {r.name: r.model for r, _ in reconciler.store.aliases()} == {"default": "tiny", "prod": "later"}
    assert not reconciler.poll(), "nothing failed and nothing changed: no pass"


def test_a_server_waiting_for_its_declared_default_serves_it(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar], volume: ConfigMapVolume
) -> None:
    """The server (following the sidecar, --wait-for-default-seconds) starts serving only once the declared
    `default` is published, and then serves it: never the local fallback model it would otherwise pick."""
    from sdserve import Client
    from tests.harness import serving

    volume.write(_yaml([_local("declared-tiny", tiny_root / "tiny-sd")], {"default": "declared-tiny"}))
    car = sidecars(
        tmp_path / "store",
        import_roots=[tiny_root],
        args=["--declared-state", str(volume.path), "--declared-poll-seconds", "0.2", "--quality-check", "false"],
    )
    with (
        serving(
            tmp_path / "local-models",
            manager_target=car.target,
            default_model="",
            wait_for_default_seconds=120,
            calibrate_batching=False,
        ) as srv,
        Client(srv.target) as c,
    ):
        result = c.generate("a red circle", steps=1, seed=1)
    assert result.parameters["model"] == "declared-tiny"
