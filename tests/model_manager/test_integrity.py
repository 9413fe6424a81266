"""Integrity at the sidecar: SetAlias verifies the target's files (every kind of damage is refused, named and recorded),
the scrub finds damage at rest and moves aliases back for good, and server reports and leases over the API."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdserve import models_cli
from sdserve.errors import SdserveError
from sdserve.models_client import AliasSet, ModelCorrupted, Snapshot, WatchEvent
from tests.model_manager.harness import Sidecar

UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"

# How each kind of damage is done, and the file and rule its refusal must name.
DAMAGE: dict[str, tuple[str, str]] = {
    "flip-unet": (UNET, "sha256"),
    "flip-vae": (VAE, "sha256"),
    "edit-config": ("unet/config.json", "sha256"),
    "edit-tokenizer": ("tokenizer/vocab.json", "sha256"),
    "truncate": (TEXT, "truncated"),
    "delete-vae": (VAE, "missing"),
    "extra-file": ("unet/extra.safetensors", "not listed in manifest.json"),
}


def flip(path: Path, offset: int = -1, keep_mtime: bool = False) -> None:
    """Inverts one byte in place (same size; with keep_mtime the file's mtime is put back too)."""
    st = os.stat(path)
    with path.open("r+b") as fh:
        fh.seek(offset if offset >= 0 else st.st_size + offset)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage(folder: Path, kind: str) -> None:
    rel, _ = DAMAGE[kind]
    if kind.startswith(("flip", "edit")):
        flip(folder / rel, 60)
    elif kind == "truncate":
        (folder / rel).write_bytes((folder / rel).read_bytes()[:1000])
    elif kind == "delete-vae":
        (folder / rel).unlink()
    elif kind == "extra-file":
        (folder / rel).write_bytes(b"{}")


def next_of(events: Iterator[WatchEvent], kind: type) -> WatchEvent:
    """The next event of `kind` on a watch stream (others are skipped)."""
    for ev in events:
        if isinstance(ev, kind):
            return ev
    raise AssertionError(f"the stream ended before a {kind.__name__}")


def test_set_alias_refuses_a_target_with_any_kind_of_damage(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar], capsys: pytest.CaptureFixture[str]
) -> None:
    side = sidecars(tmp_path / "store", import_roots=[tiny_root])
    source = str(tiny_root / "tiny-sd")
    with side.client() as c, c.watch() as watch:
        events = iter(watch)
        assert isinstance(next(events), Snapshot)
        good = c.import_model(source, name="good").model
        c.set_alias("prod", "good")
        for kind, (rel, rule) in DAMAGE.items():
            name = f"m-{kind}"
            model = c.import_model(source, name=name).model
            damage(Path(model.path), kind)
            with pytest.raises(SdserveError) as err:
                c.set_alias("prod", name)
            assert err.value.code == "FAILED_PRECONDITION", kind
            assert rel in err.value.message and rule in err.value.message and "corrupt" in err.value.message, kind
            corrupted = next_of(events, ModelCorrupted)
            assert isinstance(corrupted, ModelCorrupted) and corrupted.model.name == name
            assert any(p.startswith(f"{rel}: ") and rule in p for p in corrupted.problems), corrupted.problems
            (stored,) = c.list(name).models
            assert stored.state == "corrupt" and stored.error.startswith(f"{rel}: "), stored.error
            (alias,) = c.list().aliases
            assert (alias.model, alias.path) == ("good", good.path), "a refused target never moves the alias"
            assert alias.last_failure is not None and alias.last_failure.target.name == name
            assert rel in alias.last_failure.reason and not alias.last_failure.reverted
            # Refused again, now because it is known to be corrupt.
            with pytest.raises(SdserveError) as err:
                c.set_alias("prod", name)
            assert err.value.code == "FAILED_PRECONDITION" and rel in err.value.message
    # `models list` and `models show` report both.
    assert models_cli.main(["list", "--manager", side.target]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and "last failure" in out and "alias prod -> good@" in out
    assert models_cli.main(["show", "m-flip-vae", "--manager", side.target]) == 0
    out = capsys.readouterr().out
    assert "corrupt" in out and VAE in out and "sha256" in out


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def test_the_scrub_finds_damage_at_rest_and_the_alias_goes_back_for_good(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    args = ["--scrub-interval-seconds", "0.2"]
    side = sidecars(store, import_roots=[tiny_root], metrics=True, args=args)
    with side.client() as c:
        a = c.import_model(str(tiny_root / "tiny-sd"), name="a").model
        b = c.import_model(str(tiny_root / "tiny-sd-old"), name="b").model
        c.set_alias("prod", "a")
        alias, _ = c.set_alias("prod", "b")
        assert alias.revert_to is not None and alias.revert_to.name == "a"
        with c.watch() as watch:
            events = iter(watch)
            assert isinstance(next(events), Snapshot)
            # Bytes that change while size and mtime stay put: only a full read finds them.
            flip(Path(b.path) / UNET, 5000, keep_mtime=True)
            corrupted = next_of(events, ModelCorrupted)
            moved = next_of(events, AliasSet)
        assert isinstance(corrupted, ModelCorrupted) and corrupted.model.name == "b"
        assert corrupted.problems[0].startswith(f"{UNET}: sha256")
        assert isinstance(moved, AliasSet) and moved.reverted and UNET in moved.reason
        assert (moved.alias.name, moved.alias.path, moved.previous and moved.previous.model) == ("prod", a.path, "b")
        (alias,) = c.list().aliases
        assert alias.model == "a" and alias.revert_to is None
        assert alias.last_failure is not None and alias.last_failure.reverted and alias.last_failure.reporter == "scrub"
    metrics = scrape(side.metrics_port)
    assert metrics["sdserve_manager_scrub_runs_total"] >= 1
    assert metrics["sdserve_manager_scrub_last_run_timestamp_seconds"] > 0
    assert metrics["sdserve_manager_scrub_read_bytes_total"] >= a.size_bytes + b.size_bytes
    assert metrics["sdserve_manager_scrub_interval_seconds"] == 0.2
    assert metrics["sdserve_manager_corrupt_variants_found_total"] == 1
    assert metrics["sdserve_manager_alias_reverts_total"] == 1

    # Every restart agrees: the alias serves its last good target, and the failure is on record.
    side.stop()
    assert json.loads((store / "aliases.json").read_text())["prod"]["model"] == "a"
    again = sidecars(store, import_roots=[tiny_root])
    with again.client() as c:
        (alias,) = c.list().aliases
        assert alias.model == "a" and alias.last_failure is not None and UNET in alias.last_failure.reason
        assert {m.name: m.state for m in c.list().models} == {"a": "ready", "b": "corrupt"}


def test_server_reports_and_leases_over_the_api(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    side = sidecars(tmp_path / "store", import_roots=[tiny_root])
    with side.client() as c:
        a = c.import_model(str(tiny_root / "tiny-sd"), name="a").model
        b = c.import_model(str(tiny_root / "tiny-sd-old"), name="b").model
        c.set_alias("prod", "a")
        c.set_alias("prod", "b")
        alias, reverted = c.report_alias_failure("prod", "b", b.revision, "fp32", "ValueError: size mismatch")
        assert reverted and alias.model == "a"
        assert alias.last_failure is not None and "size mismatch" in alias.last_failure.reason
        assert alias.last_failure.reporter == "server" and alias.last_failure.target.name == "b"

        unknown, expires = c.renew_leases("server-x", [("a", a.revision, "fp32"), ("gone", "0" * 16, "fp32")])
        assert [u.name for u in unknown] == ["gone"] and expires > 0
        leased = {m.name: m.lease_holders for m in c.list().models}
        assert leased == {"a": 1, "b": 0}
        c.renew_leases("server-x", [])
        assert {m.name: m.lease_holders for m in c.list().models} == {"a": 0, "b": 0}

        # Every error names the field and the rule.
        cases: list[tuple[Callable[[], object], str]] = [
            (lambda: c.report_alias_failure("prod", "b", b.revision, "", "x"), "target.variant"),
            (lambda: c.report_alias_failure("prod", "b", b.revision, "fp32", ""), "reason"),
            (lambda: c.report_alias_failure("prod", "b", b.revision, "fp32", "x" * 2001), "reason"),
            (lambda: c.report_alias_failure("../p", "b", b.revision, "fp32", "x"), "alias"),
            (lambda: c.renew_leases("bad holder", []), "holder"),
            (lambda: c.renew_leases("h", [("a", a.revision, "fp32")], lease_seconds=7200), "lease_seconds"),
            (lambda: c.renew_leases("h", [("a/b", a.revision, "fp32")]), "variants[0].name"),
        ]
        for call, field in cases:
            with pytest.raises(SdserveError) as err:
                call()
            assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == field, err.value
        with pytest.raises(SdserveError) as err:
            c.report_alias_failure("nope", "b", b.revision, "fp32", "x")
        assert err.value.code == "NOT_FOUND"
