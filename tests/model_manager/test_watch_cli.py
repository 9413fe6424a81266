"""WatchModels events, alias rules, the Unix socket, and the `sdserve models` commands."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sdserve import models_cli
from sdserve.errors import SdserveError
from sdserve.models_client import (
    AliasRemoved,
    AliasSet,
    ModelManagerClient,
    ModelPublished,
    ModelRemoved,
    OperationProgress,
    Snapshot,
)
from tests.model_manager.harness import TINY_REPO, Sidecar


def test_watch_sends_a_snapshot_then_one_event_per_change(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    side = sidecars(store, import_roots=[tiny_root])
    with side.client() as c:
        sd = c.import_model(str(tiny_root / "tiny-sd")).model
        c.set_alias("default", "tiny-sd")
        with c.watch() as watch:
            events = iter(watch)
            snap = next(events)
            assert isinstance(snap, Snapshot)
            assert [m.path for m in snap.models] == [sd.path] and snap.models[0].aliases == ("default",)
            assert [(a.name, a.path) for a in snap.aliases] == [("default", sd.path)]
            assert snap.store_path == str(store.resolve()) and snap.instance_id

            inpaint = c.import_model(str(tiny_root / "tiny-inpaint")).model
            c.set_alias("default", "tiny-inpaint")
            c.delete_alias("default")
            c.delete("tiny-sd")
            published, swapped, unaliased, removed = next(events), next(events), next(events), next(events)
        assert isinstance(published, ModelPublished) and published.model.path == inpaint.path
        assert published.model.unet_in_channels == 9
        assert isinstance(swapped, AliasSet)
        assert (swapped.alias.name, swapped.alias.path, swapped.target.path) == ("default", inpaint.path, inpaint.path)
        assert swapped.previous is not None and swapped.previous.path == sd.path
        assert isinstance(unaliased, AliasRemoved) and unaliased.alias.model == "tiny-inpaint"
        assert isinstance(removed, ModelRemoved) and removed.reason == "deleted" and removed.model.path == sd.path
        assert [e.sequence for e in (published, swapped, unaliased, removed)] == list(
            range(snap.sequence + 1, snap.sequence + 5)
        )
        assert not Path(sd.path).exists()

    # The stream ends with an error when the sidecar dies; a new subscription after a restart starts afresh.
    watch = ModelManagerClient(side.target).watch()
    events = iter(watch)
    assert isinstance(next(events), Snapshot)
    side.kill()
    with pytest.raises(SdserveError) as err:
        next(events)
    assert err.value.code == "UNAVAILABLE"
    again = sidecars(store, import_roots=[tiny_root])
    with again.client() as c, c.watch() as w:
        fresh = next(iter(w))
    assert isinstance(fresh, Snapshot) and fresh.instance_id != snap.instance_id
    assert [m.path for m in fresh.models] == [inpaint.path]


def test_alias_rules(tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]) -> None:
    store = tmp_path / "store"
    side = sidecars(store, import_roots=[tiny_root])
    with side.client() as c:
        sd = c.import_model(str(tiny_root / "tiny-sd")).model
        alias, previous = c.set_alias("prod", "tiny-sd", variant="fp32")
        assert previous is None and alias.path == sd.path and alias.revision == sd.revision
        stored = json.loads((store / "aliases.json").read_text())
        assert stored["prod"]["model"] == "tiny-sd" and stored["prod"]["revision"] == sd.revision
        assert stored["prod"]["variant"] == "fp32"
        cases: list[tuple[Callable[[], object], str, str | None]] = [
            (lambda: c.set_alias("prod", "missing"), "NOT_FOUND", None),
            (lambda: c.set_alias("../prod", "tiny-sd"), "INVALID_ARGUMENT", "alias"),
            (lambda: c.set_alias("prod", "tiny-sd", variant="int8"), "NOT_FOUND", None),
            (lambda: c.set_alias("prod", "tiny-sd", revision="ffffffffffffffff"), "NOT_FOUND", None),
            (lambda: c.set_alias("tiny-sd", "tiny-sd"), "FAILED_PRECONDITION", None),
            (lambda: c.delete("tiny-sd"), "FAILED_PRECONDITION", None),
            (lambda: c.delete_alias("nope"), "NOT_FOUND", None),
            (lambda: c.import_model(str(tiny_root / "tiny-sd"), name="prod"), "INVALID_ARGUMENT", "name"),
        ]
        for call, code, field in cases:
            with pytest.raises(SdserveError) as err:
                call()
            assert err.value.code == code, (err.value, code)
            if field:
                assert err.value.violations[0].field == field
        with pytest.raises(SdserveError) as err:
            c.delete("tiny-sd")
        assert "alias 'prod' points at" in err.value.message


def test_unix_socket(tmp_path: Path, sidecars: Callable[..., Sidecar]) -> None:
    sock = tmp_path / "run" / "manager.sock"
    sidecars(tmp_path / "store", args=["--unix-socket", str(sock)])
    with ModelManagerClient(f"unix:{sock}") as c:
        assert c.list().usage.store_path == str((tmp_path / "store").resolve())


def test_transfer_bar_shows_bytes_and_rate_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    bar = models_cli.TransferBar(out, enabled=True)
    bar.update(OperationProgress("downloading", "unet/x.safetensors", 0, 4 * 1024**3, 0, ""))
    bar.update(OperationProgress("downloading", "unet/x.safetensors", 1024**3, 4 * 1024**3, 0, ""))
    bar.done()
    line = out.getvalue().rsplit("\r", 1)[-1]
    assert "1.0 GiB / 4.0 GiB" in line and "/s" in line and "[#######" in line and "unet/x.safetensors" in line


def test_cli_commands(sidecar: Sidecar, tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> str:
        code = models_cli.main([*argv, "--manager", sidecar.target])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return captured.out + captured.err

    out = run("pull", TINY_REPO)
    assert "downloading" in out and "pulled tiny-sd@" in out and ":fp32" in out
    out = run("import", str(tiny_root / "tiny-inpaint"), "--name", "inpaint")
    assert "imported inpaint@" in out
    out = run("quantize", "tiny-sd", "--to", "fp16", "--no-quality")
    assert "made tiny-sd@" in out and ":fp16" in out
    assert "default -> tiny-sd@" in run("alias", "set", "default", "tiny-sd:fp16")
    listing = run("list")
    assert "tiny-sd" in listing and "inpaint" in listing and "alias default -> tiny-sd@" in listing
    assert "fp16" in listing and "store " in listing
    shown = run("show", "tiny-sd", "--files")
    assert "hub sdserve-test/tiny-sd@main" in shown and "unet/diffusion_pytorch_model.safetensors" in shown
    assert "not measured" in shown
    data = json.loads(run("list", "--json"))
    assert {m["variant"] for m in data["models"]} == {"fp32", "fp16"}
    run("alias", "rm", "default")
    run("pin", "inpaint")
    assert "(pinned)" in run("list")
    out = run("rm", "tiny-sd:fp16")
    assert "removed tiny-sd@" in out and "freed" in out
    # Errors exit non-zero with one line naming the field.
    code = models_cli.main(["rm", "../x", "--manager", sidecar.target])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sdserve: error: name:")
