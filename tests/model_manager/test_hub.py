"""Hub pulls through the real huggingface_hub client against a local hub: fresh, pinned, resumed, corrupt, offline."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from model_manager.manifest import read_manifest
from sdserve.errors import SdserveError
from sdserve.models_client import OperationProgress
from sdserve_core.manifest import verify
from service.models import ModelEntry
from tests.model_manager.harness import BIG_REPO, TINY_REPO, Sidecar
from tests.model_manager.hubserver import Cut, HubServer, Stall

CHUNK = 10 * 1024 * 1024  # huggingface_hub's download chunk: bytes reach the disk in pieces of this size
NEEDED = {
    "model_index.json",
    "sdserve.json",
    "manifest.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _store_is_clean(store: Path) -> None:
    assert not any((store / "staging").iterdir()), "staging must be empty after an operation"


def test_fresh_pull_pins_the_commit_and_takes_only_needed_safetensors(
    sidecar: Sidecar, hub: HubServer, repo_files: dict[str, dict[str, bytes]]
) -> None:
    reports: list[OperationProgress] = []
    with sidecar.client() as c:
        result = c.pull(TINY_REPO, on_progress=reports.append)
    commit = hub.repos[TINY_REPO].refs["main"]
    m = result.model
    assert (m.name, m.revision, m.variant, m.state) == ("tiny-sd", commit, "fp32", "ready")
    assert m.source.kind == "hub" and m.source.commit == commit and m.source.requested_revision == "main"
    folder = Path(m.path)
    assert folder == sidecar.store.resolve() / "models" / "tiny-sd" / commit / "fp32"
    assert _files(folder) == NEEDED
    main = repo_files["main"]
    assert result.downloaded_bytes == sum(len(main[n]) for n in NEEDED - {"manifest.json"})
    # Weights are byte-identical to the Hub's; pickles, the root checkpoint and the safety checker were never fetched.
    assert (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes() == main[
        "unet/diffusion_pytorch_model.safetensors"
    ]
    fetched = {p for meth, p, _ in hub.requests if meth == "GET" and "/resolve/" in p}
    assert all(f"/resolve/{commit}/" in p for p in fetched), "every file is fetched at the resolved commit"
    assert not any(p.endswith((".bin", ".ckpt", "README.md")) or "safety_checker" in p for p in fetched)
    # The manifest lists every file's sha256, and the folder is what the server reads.
    manifest = read_manifest(folder)
    assert verify(folder, manifest) == []
    assert {f.path for f in manifest.files} == NEEDED - {"manifest.json"}
    weights = next(f for f in manifest.files if f.path == "unet/diffusion_pytorch_model.safetensors")
    assert weights.sha256 == hashlib.sha256(main["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    meta = json.loads((folder / "sdserve.json").read_text())
    assert (meta["name"], meta["revision"], meta["variant"]) == ("tiny-sd", commit, "fp32")
    assert meta["description"]
    entry = ModelEntry.read(folder, name="tiny-sd")
    assert (entry.revision, entry.variant) == (commit, "fp32")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    # Progress: resolving, then downloading with byte counts that end at the total.
    stages = [r.stage for r in reports]
    assert stages[0] == "resolving" and "downloading" in stages and stages[-1] == "publishing"
    last_download = [r for r in reports if r.stage == "downloading"][-1]
    assert last_download.done_bytes == last_download.total_bytes > 0
    _store_is_clean(sidecar.store)
    # A second pull of the same revision fetches nothing.
    hub.requests.clear()
    with sidecar.client() as c:
        again = c.pull(TINY_REPO)
    assert again.already_present and again.model.path == m.path
    assert not [p for meth, p, _ in hub.requests if "/resolve/" in p]


def test_pull_of_a_pinned_revision(sidecar: Sidecar, hub: HubServer) -> None:
    old = hub.repos[TINY_REPO].refs["v0.1"]
    with sidecar.client() as c:
        by_tag = c.pull(TINY_REPO, revision="v0.1")
        by_sha = c.pull(TINY_REPO, revision=old)
        main = c.pull(TINY_REPO)
        listing = c.list("tiny-sd")
    assert by_tag.model.revision == old and by_tag.model.source.requested_revision == "v0.1"
    assert by_sha.already_present and by_sha.model.path == by_tag.model.path
    assert main.model.revision != old
    assert {m.revision for m in listing.models} == {old, main.model.revision}
    # Aliases default to the newest revision.
    with sidecar.client() as c:
        alias, _ = c.set_alias("default", "tiny-sd")
    assert alias.revision == main.model.revision


def test_pull_fp16_takes_the_repositorys_fp16_files(sidecar: Sidecar, hub: HubServer) -> None:
    with sidecar.client() as c:
        result = c.pull(TINY_REPO, variant="fp16")
    folder = Path(result.model.path)
    assert result.model.variant == "fp16" and folder.name == "fp16"
    assert not result.also_published, "no fp32 copy is needed when the repository has fp16 files"
    fetched = [p for meth, p, _ in hub.requests if meth == "GET" and p.endswith(".safetensors")]
    assert fetched and all(p.endswith(".fp16.safetensors") for p in fetched)
    # Stored under the standard names, so a plain from_pretrained loads them.
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert ModelEntry.read(folder).variant == "fp16"


def test_transfer_cut_mid_file_is_resumed(sidecar: Sidecar, hub: HubServer) -> None:
    name = "unet/diffusion_pytorch_model.safetensors"
    size = len(hub.repos[BIG_REPO].commits[hub.repos[BIG_REPO].refs["main"]][name])
    at = size - 1024 * 1024
    assert at > CHUNK, "the cut must fall after the first 10 MiB chunk that huggingface_hub writes to disk"
    # The connection drops after `at` bytes and huggingface_hub's own retry gets HTTP 503: the pull fails.
    hub.cuts.append(Cut(name, at, fail_after=1))
    with sidecar.client() as c, pytest.raises(SdserveError) as err:
        c.pull(BIG_REPO)
    assert err.value.code == "UNAVAILABLE"
    assert "next pull resumes" in err.value.message
    assert not (sidecar.store / "models").exists() or not any((sidecar.store / "models").iterdir())
    _store_is_clean(sidecar.store)
    partials = list((sidecar.store / "downloads").glob("*.part"))
    assert len(partials) == 1
    kept = partials[0].stat().st_size
    assert CHUNK <= kept <= at
    # The next pull asks only for the rest of the file.
    with sidecar.client() as c:
        result = c.pull(BIG_REPO)
    assert result.resumed_bytes == kept
    assert hub.ranges(name)[-1] == f"bytes={kept}-"
    folder = Path(result.model.path)
    assert verify(folder, read_manifest(folder)) == []
    assert not list((sidecar.store / "downloads").glob("*.part"))


def test_cancelling_a_pull_leaves_nothing_behind(sidecar: Sidecar, hub: HubServer) -> None:
    stall = Stall("unet/diffusion_pytorch_model.safetensors", 1024)
    hub.stalls.append(stall)
    with sidecar.client() as c:
        stream = c.stream_pull(TINY_REPO)
        assert stall.reached.wait(60)
        stream.cancel()
        stall.release.set()
        assert sidecar.wait_for_log("operation cancelled")
        _store_is_clean(sidecar.store)
        assert c.list().models == ()
        # The name is free again.
        assert c.pull(TINY_REPO).model.state == "ready"


def test_a_file_whose_bytes_do_not_match_is_rejected(sidecar: Sidecar, hub: HubServer) -> None:
    hub.corrupt.add((TINY_REPO, "vae/diffusion_pytorch_model.safetensors"))
    with sidecar.client() as c:
        with pytest.raises(SdserveError) as err:
            c.pull(TINY_REPO)
        assert err.value.code == "DATA_LOSS"
        assert "vae/diffusion_pytorch_model.safetensors" in err.value.message
        assert "sha256" in err.value.message
        assert c.list().models == ()
    _store_is_clean(sidecar.store)
    assert not list((sidecar.store / "downloads").glob("*.part")), "the bad bytes are not kept for a resume"
    # Once the Hub serves the right bytes, the pull succeeds.
    hub.corrupt.clear()
    with sidecar.client() as c:
        assert c.pull(TINY_REPO).model.state == "ready"


def test_offline_mode_answers_from_the_store(sidecar: Sidecar, hub: HubServer) -> None:
    with sidecar.client() as c:
        online = c.pull(TINY_REPO)
    hub.stop()
    with sidecar.client() as c:
        offline = c.pull(TINY_REPO)
        assert offline.offline and offline.already_present
        assert offline.model.path == online.model.path
        by_sha = c.pull(TINY_REPO, revision=online.model.revision[:10])
        assert by_sha.offline and by_sha.model.path == online.model.path
        with pytest.raises(SdserveError) as err:
            c.pull(TINY_REPO, revision="v0.1")
        assert err.value.code == "UNAVAILABLE"
        assert "no copy" in err.value.message


def test_offline_setting_never_contacts_the_hub(
    tmp_path: Path, hub: HubServer, sidecars: Callable[..., Sidecar]
) -> None:
    store = tmp_path / "store"
    first = sidecars(store, hub_url=hub.url)
    with first.client() as c:
        c.pull(TINY_REPO)
    first.stop()
    hub.requests.clear()
    second = sidecars(store, hub_url=hub.url, args=["--offline", "true"])
    with second.client() as c:
        result = c.pull(TINY_REPO)
    assert result.offline and result.model.state == "ready"
    assert hub.requests == []


def test_hub_errors_are_clear(sidecar: Sidecar) -> None:
    with sidecar.client() as c:
        with pytest.raises(SdserveError) as err:
            c.pull("sdserve-test/missing")
        assert err.value.code == "NOT_FOUND"
        with pytest.raises(SdserveError) as err:
            c.pull(TINY_REPO, revision="no-such-branch")
        assert err.value.code == "NOT_FOUND" and "no-such-branch" in err.value.message
        with pytest.raises(SdserveError) as err:
            c.pull("sdserve-test/pickled")
        assert err.value.code == "INVALID_ARGUMENT"
        assert err.value.violations[0].field == "repo_id"
        assert "only pickled weights" in err.value.violations[0].description
        with pytest.raises(SdserveError) as err:
            c.pull("../etc/passwd")
        assert err.value.violations[0].field == "repo_id"
        with pytest.raises(SdserveError) as err:
            c.pull(TINY_REPO, name="../escape")
        assert [v.field for v in err.value.violations] == ["name"]
