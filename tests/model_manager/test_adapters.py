"""Adapters in the store through a real sidecar: import (diffusers and kohya LoRAs, an embedding), list, show, verify,
remove, pull from the local hub, and every refusal leaving nothing behind."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserve.errors import SdserveError
from sdserve.models_client import ModelManagerClient, Snapshot
from sdserve_core import adapter_file as af
from tests.model_manager.harness import Sidecar
from tests.model_manager.hubserver import HubServer
from tests.test_adapter_file import kohya_state_dict, make_diffusers_lora

LORA_REPO = "sdserve-test/tiny-lora"


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path) -> Path:
    """An import folder with a real diffusers-layout LoRA of tiny-sd, the same in kohya layout, an embedding, a second
    embedding, a pickled file, a non-adapter safetensors file and a file that only looks like safetensors."""
    root = tmp_path_factory.mktemp("adapters")
    sd = make_diffusers_lora(tiny_root / "tiny-sd", root / "style.safetensors")
    save_file(kohya_state_dict(sd), root / "style-kohya.safetensors")
    save_file({"<cat>": torch.randn(2, 32)}, root / "cat.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, root / "dog.safetensors")
    save_file({"model.weight": torch.ones(4, 4)}, root / "not-an-adapter.safetensors")
    (root / "lora.pt").write_bytes(b"\x80\x02pickled")
    (root / "renamed.safetensors").write_bytes(b"PK\x03\x04" + bytes(60))
    return root


@pytest.fixture()
def car(tmp_path: Path, hub: HubServer, adapter_root: Path, sidecars: Callable[..., Sidecar]) -> Sidecar:
    return sidecars(tmp_path / "store", hub_url=hub.url, import_roots=[adapter_root])


def _clean(store: Path) -> None:
    """Nothing half-written: staging/ is empty and every adapters/ entry is a complete adapter."""
    assert list((store / "staging").iterdir()) == []
    for folder in (store / "adapters").iterdir():
        assert (folder / af.WEIGHTS).is_file() and (folder / af.MANIFEST).is_file(), folder


def _refused(c: ModelManagerClient, path: Path, name: str = "", **kw: object) -> SdserveError:
    with pytest.raises(SdserveError) as err:
        c.import_adapter(str(path), name=name, **kw)  # type: ignore[arg-type]
    return err.value


def test_import_list_show_and_remove(car: Sidecar, adapter_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with car.client() as c:
        style = c.import_adapter(str(adapter_root / "style.safetensors")).adapter
        kohya = c.import_adapter(str(adapter_root / "style-kohya.safetensors"), name="style-k").adapter
        cat = c.import_adapter(str(adapter_root / "cat.safetensors")).adapter
        dog = c.import_adapter(str(adapter_root / "dog.safetensors"), token="<dog>").adapter
        assert (style.name, style.kind, style.layout, style.family) == ("style", "lora", "diffusers", "sd15")
        assert style.base == kohya.base == "cross_attention_dim=32,text_width=32"
        assert style.targets == kohya.targets == ("text_encoder", "unet")
        assert (kohya.layout, kohya.token) == ("kohya", "")
        assert (cat.kind, cat.layout, cat.token, cat.base) == (
            "textual_inversion",
            "diffusers",
            "<cat>",
            "text_width=32",
        )
        assert (dog.layout, dog.token) == ("a1111", "<dog>")
        folder = Path(style.path)
        assert folder == store / "adapters" / "style"
        assert sorted(p.name for p in folder.iterdir()) == [af.MANIFEST, af.WEIGHTS]
        assert (folder / af.WEIGHTS).read_bytes() == (adapter_root / "style.safetensors").read_bytes()
        assert style.sha256 == af.sha256_file(adapter_root / "style.safetensors")
        assert style.source == f"file:{adapter_root / 'style.safetensors'}"
        assert af.read_manifest(folder).file.base == style.base
        assert json.loads((folder / af.MANIFEST).read_text())["sha256"] == style.sha256

        listing = c.list_adapters()
        assert [a.name for a in listing.adapters] == ["cat", "dog", "style", "style-k"]
        assert listing.adapters_dir == str(store / "adapters")
        assert c.get_adapter("style", verify=True) == c.get_adapter("style")

        # The same file again is already there; other weights under the name need replace.
        again = c.import_adapter(str(adapter_root / "style.safetensors"))
        assert again.already_present and not again.replaced
        err = _refused(c, adapter_root / "cat.safetensors", name="style")
        assert err.code == "ALREADY_EXISTS" and "style" in err.message
        swapped = c.import_adapter(str(adapter_root / "cat.safetensors"), name="style", replace=True)
        assert swapped.replaced and swapped.adapter.kind == "textual_inversion"
        assert c.get_adapter("style").sha256 == cat.sha256

        removed = c.delete_adapter("style-k")
        assert removed.name == "style-k" and not (store / "adapters" / "style-k").exists()
        calls: list[Callable[[], object]] = [lambda: c.get_adapter("style-k"), lambda: c.delete_adapter("style-k")]
        for call in calls:
            with pytest.raises(SdserveError) as nf:
                call()
            assert nf.value.code == "NOT_FOUND" and "name" in nf.value.message
    # Watched last, on its own: closing a second channel while the first is in use can reset their shared connection.
    with car.client() as w, w.watch() as watch:
        snapshot = next(iter(watch))
    assert isinstance(snapshot, Snapshot) and snapshot.adapters_dir == str(store / "adapters")
    _clean(store)


def test_refusals_leave_nothing_behind(car: Sidecar, adapter_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with car.client() as c:
        err = _refused(c, adapter_root / "lora.pt")
        assert err.code == "INVALID_ARGUMENT" and err.violations[0].field == "path"
        assert "only .safetensors; pickle formats are refused" in err.message
        err = _refused(c, adapter_root / "renamed.safetensors")
        assert err.code == "INVALID_ARGUMENT" and "pickle formats are refused" in err.message
        err = _refused(c, adapter_root / "not-an-adapter.safetensors")
        assert err.code == "INVALID_ARGUMENT" and "no recognisable keys" in err.message
        for bad in ("../up", "a/b", ".hidden"):
            err = _refused(c, adapter_root / "cat.safetensors", name=bad)
            assert err.code == "INVALID_ARGUMENT" and err.violations[0].field == "name", bad
        err = _refused(c, adapter_root / "cat.safetensors", token="two words")
        assert err.code == "INVALID_ARGUMENT" and err.violations[0].field == "token"
        err = _refused(c, tmp_path / "elsewhere.safetensors")
        assert err.code == "INVALID_ARGUMENT" and err.violations[0].field == "path"
        with pytest.raises(SdserveError) as bad_name:
            c.get_adapter("../x")
        assert bad_name.value.code == "INVALID_ARGUMENT"
        assert c.list_adapters().adapters == ()
    assert list((store / "adapters").iterdir()) == []
    _clean(store)


def test_a_changed_file_fails_verification(car: Sidecar, adapter_root: Path, tmp_path: Path) -> None:
    with car.client() as c:
        stored = c.import_adapter(str(adapter_root / "cat.safetensors")).adapter
        weights = Path(stored.path) / af.WEIGHTS
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(SdserveError) as err:
            c.get_adapter("cat", verify=True)
        assert err.value.code == "DATA_LOSS"
        assert "adapter.safetensors: sha256" in err.value.message and "adapter.json" in err.value.message
        assert "does not match" in c.list_adapters().adapters[0].error
        # Importing it again repairs it.
        assert not c.import_adapter(str(adapter_root / "cat.safetensors")).already_present
        assert c.get_adapter("cat", verify=True).error == ""


def test_pull_from_the_hub(car: Sidecar, hub: HubServer, adapter_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    lora = (adapter_root / "style.safetensors").read_bytes()
    repo = hub.repo(LORA_REPO)
    commit = repo.add_commit({"README.md": b"# a tiny LoRA\n", "pytorch_lora_weights.safetensors": lora})
    two = hub.repo("sdserve-test/two-files")
    two.add_commit({"a.safetensors": lora, "b.safetensors": (adapter_root / "cat.safetensors").read_bytes()})
    hub.repo("sdserve-test/pickled-lora").add_commit({"lora.bin": b"\x80\x02pickled"})
    with car.client() as c:
        got = c.pull_adapter(LORA_REPO)
        a = got.adapter
        assert (a.name, a.kind, a.layout, a.base) == (
            "tiny-lora",
            "lora",
            "diffusers",
            "cross_attention_dim=32,text_width=32",
        )
        assert a.source == f"hub:{LORA_REPO}@{commit}/pytorch_lora_weights.safetensors"
        assert got.downloaded_bytes >= len(lora)
        assert (Path(a.path) / "README.md").read_bytes() == b"# a tiny LoRA\n"
        assert (Path(a.path) / af.WEIGHTS).read_bytes() == lora
        assert c.pull_adapter(LORA_REPO).already_present

        with pytest.raises(SdserveError) as err:
            c.pull_adapter("sdserve-test/two-files")
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "filename"
        assert "a.safetensors" in err.value.message and "b.safetensors" in err.value.message
        cat = c.pull_adapter("sdserve-test/two-files", filename="b.safetensors", name="cat", token="<kitty>")
        assert (cat.adapter.kind, cat.adapter.token) == ("textual_inversion", "<kitty>")

        with pytest.raises(SdserveError) as err:
            c.pull_adapter("sdserve-test/pickled-lora")
        assert err.value.code == "INVALID_ARGUMENT" and "pickle formats are refused" in err.value.message
        with pytest.raises(SdserveError) as err:
            c.pull_adapter("sdserve-test/two-files", filename="a.bin")
        assert err.value.code == "INVALID_ARGUMENT" and err.value.violations[0].field == "filename"
        with pytest.raises(SdserveError) as err:
            c.pull_adapter("sdserve-test/absent")
        assert err.value.code == "NOT_FOUND"

        hub.corrupt.add(("sdserve-test/two-files", "a.safetensors"))
        with pytest.raises(SdserveError) as err:
            c.pull_adapter("sdserve-test/two-files", filename="a.safetensors", name="broken")
        assert err.value.code == "DATA_LOSS" and "sha256" in err.value.message
        assert not (store / "adapters" / "broken").exists()
        assert sorted(x.name for x in c.list_adapters().adapters) == ["cat", "tiny-lora"]
    _clean(store)


def test_adapters_survive_a_restart_and_show_in_metrics(
    tmp_path: Path, adapter_root: Path, sidecars: Callable[..., Sidecar]
) -> None:
    import urllib.request

    store = tmp_path / "store"
    first = sidecars(store, import_roots=[adapter_root])
    with first.client() as c:
        c.import_adapter(str(adapter_root / "cat.safetensors"))
    first.stop()
    second = sidecars(store, import_roots=[adapter_root], metrics=True)
    with second.client() as c:
        assert [a.name for a in c.list_adapters().adapters] == ["cat"]
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline and "sdserve_manager_stored_adapters" not in text:
        text = urllib.request.urlopen(f"http://127.0.0.1:{second.metrics_port}/metrics").read().decode()
    assert "sdserve_manager_stored_adapters 1.0" in text
    assert f"sdserve_manager_adapter_bytes {float((adapter_root / 'cat.safetensors').stat().st_size)}" in text


def test_the_cli_commands(car: Sidecar, adapter_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdserve import models_cli

    def run(*args: str) -> str:
        assert models_cli.main(["adapters", *args, "--manager", car.target]) == 0
        return capsys.readouterr().out

    assert "imported adapter cat (textual_inversion; diffusers; sd15" in run(
        "import", str(adapter_root / "cat.safetensors"), "--quiet"
    )
    assert "imported adapter style (lora; kohya" in run(
        "import", str(adapter_root / "style-kohya.safetensors"), "--name", "style", "--quiet"
    )
    listed = run("list")
    assert "cat" in listed and "<cat>" in listed and "cross_attention_dim=32,text_width=32" in listed
    assert json.loads(run("show", "style", "--verify", "--json"))["layout"] == "kohya"
    assert "removed adapter cat" in run("rm", "cat")
    assert models_cli.main(["adapters", "show", "cat", "--manager", car.target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
