"""A shared read-only store (--read-only-store, --state-dir): a store populated once by a writing sidecar is served by
sidecars that never write to it. Declared models are found there (missing ones are broken entries, named), aliases
live in the state folder, every write over the API is refused with FAILED_PRECONDITION, and a server follows it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from model_manager.settings import Settings
from sdserve import Client
from sdserve.errors import SdserveError
from sdserve.models_client import Alias
from tests.harness import serving, wait_until
from tests.model_manager.harness import Sidecar
from tests.model_manager.test_declared import SERVING, ConfigMapVolume, _local, _yaml, aliases, entries, health, passes

_NONE = Alias("", "", "", "", "", 0.0)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and mtime: what must not change in a read-only store."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return out


def test_settings_need_a_state_dir_for_a_read_only_store() -> None:
    with pytest.raises(SystemExit, match="read_only_store needs state_dir"):
        Settings.from_sources(["--read-only-store", "true"], {}).check()
    Settings.from_sources(["--read-only-store", "true", "--state-dir", "/tmp/state"], {}).check()


def test_a_read_only_store_serves_what_it_holds_and_writes_nothing(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "shared"
    volume = ConfigMapVolume(tmp_path / "declared")
    models = [_local("a", tiny_root / "tiny-sd"), _local("b", tiny_root / "tiny-sd-old", variants=["fp16"])]
    models.append(_local("missing", tiny_root / "tiny-inpaint"))
    volume.write(_yaml(models, {"default": "a", "prod": "b"}))
    state = tmp_path / "state"
    flags = ["--read-only-store", "true", "--state-dir", str(state), "--quality-check", "false"]
    flags += ["--declared-state", str(volume.path), "--declared-poll-seconds", "0.1", "--declared-retry-seconds", "0.2"]
    # The replica starts before the shared store is populated (a first deploy): nothing is there yet.
    car = sidecars(store, import_roots=[tiny_root], args=flags)
    wait_until(lambda: len(passes(car)) >= 1, "the first pass to end", timeout=120)
    assert "a is not in the read-only store" in str(entries(car)["models[0]"]["reason"])
    assert health(car) != SERVING, "the declared default is not there yet"
    assert not store.exists(), "a read-only sidecar creates nothing, not even the store's folders"

    # The store is populated (a populate job: a writing sidecar on the same volume); a retry pass takes it in.
    writer = sidecars(store, import_roots=[tiny_root], args=["--quality-check", "false"])
    with writer.client() as c:
        c.import_model(str(tiny_root / "tiny-sd"), name="a")
        c.import_model(str(tiny_root / "tiny-sd-old"), name="b")
    writer.stop()
    before = _tree(store)
    wait_until(lambda: aliases(car).get("default", _NONE).model == "a", "a retry pass to find the model")
    wait_until(lambda: health(car) == SERVING, "the sidecar to be ready")
    after = len(passes(car))
    wait_until(lambda: len(passes(car)) > after, "one more whole pass")

    found = entries(car, after)
    assert found["models[0]"]["state"] == "ready"
    assert "variant fp16: not in the read-only store" in str(found["models[1]"]["reason"])
    assert "missing is not in the read-only store" in str(found["models[2]"]["reason"])
    # b's entry is broken (its declared fp16 variant is missing), so its alias does not move.
    assert {n: a.model for n, a in aliases(car).items()} == {"default": "a"}
    assert (state / "aliases.json").is_file(), "the aliases live in the state folder"

    with car.client() as c:
        refused: dict[str, Callable[[], object]] = {
            "import": lambda: c.import_model(str(tiny_root / "tiny-sd"), name="c"),
            "pull": lambda: c.pull("sdserve-test/tiny", name="d"),
            "variant": lambda: c.create_variant("a", "fp16"),
            "rm": lambda: c.delete("b"),
        }
        for what, call in refused.items():
            with pytest.raises(SdserveError) as err:
                call()
            assert err.value.code == "FAILED_PRECONDITION", what
            assert "read-only (--read-only-store)" in str(err.value), what
        c.set_alias("prod", "a")  # aliases still move: they are the sidecar's own state
        assert c.list().usage.read_only

    with (
        serving(tmp_path / "local", manager_target=car.target, default_model="", wait_for_default_seconds=120) as srv,
        Client(srv.target) as client,
    ):
        result = client.generate("a red circle", steps=1, seed=1)
        assert result.parameters["model"] == "a"
        assert client.generate("a red circle", model="prod", steps=1, seed=1).parameters["model"] == "a"

    car.stop()
    assert _tree(store) == before, "nothing under the read-only store was written, created or removed"
