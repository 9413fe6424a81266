"""Store integrity in one process: verify_folder's rules for every kind of damage, the stat-keyed hash cache, CORRUPT
marking with aliases going back, the scrub, server reports, and server leases that block eviction and expire."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from model_manager import errors
from model_manager.layout import StoreLayout
from model_manager.manifest import hash_folder
from model_manager.store import CORRUPT, READY, AliasSet, Change, Corrupted, Store, StoredVariant, VariantKey
from sdserve_core.manifest import HASHES, MANIFEST, Manifest, Source, verify_folder

UNET = "unet/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
CONFIG = "unet/config.json"
VOCAB = "tokenizer/vocab.json"
FILES = {
    "model_index.json": 200,
    CONFIG: 300,
    UNET: 40_000,
    VAE: 20_000,
    TEXT: 10_000,
    VOCAB: 500,
}


class Clock:
    """A monotonic clock the test moves by hand (the store takes its clock as an argument)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write_files(folder: Path, seed: int) -> None:
    for i, (rel, size) in enumerate(sorted(FILES.items())):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((seed * 31 + i * 7 + n) % 251 for n in range(size)))


def publish(store: Store, name: str, seed: int = 0) -> StoredVariant:
    staging = store.layout.new_staging(name)
    _write_files(staging, seed)
    manifest = Manifest(
        name=name,
        revision=f"{seed:016x}",
        variant="fp32",
        description="",
        source=Source("local_folder", path=f"/imports/{name}"),
        files=hash_folder(staging),
        created_at=time.time(),
    )
    return store.publish(staging, manifest)


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def open_store(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., Store]]:
    """Opens stores on tmp_path/store (one at a time: each holds the store's lock); closes them at the end."""
    opened: list[Store] = []

    def make(**kwargs: object) -> Store:
        for s in opened:
            s.close()
        store = Store(StoreLayout(tmp_path / "store"), clock=clock, **kwargs)  # type: ignore[arg-type]
        store.open()
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def _flip(path: Path, offset: int = 100) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _damage(folder: Path, kind: str) -> str:
    """Damages a published folder one way; returns the file the problem must name."""
    if kind == "flip-unet":
        _flip(folder / UNET)
        return UNET
    if kind == "flip-vae":
        _flip(folder / VAE, 5)
        return VAE
    if kind == "edit-config":
        _flip(folder / CONFIG, 10)
        return CONFIG
    if kind == "edit-tokenizer":
        _flip(folder / VOCAB, 0)
        return VOCAB
    if kind == "flip-keeping-mtime":
        st = os.stat(folder / UNET)
        _flip(folder / UNET, 2000)
        os.utime(folder / UNET, ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime still tells
        return UNET
    if kind == "truncate":
        path = folder / TEXT
        path.write_bytes(path.read_bytes()[:100])
        return TEXT
    if kind == "delete":
        (folder / VAE).unlink()
        return VAE
    if kind == "extra-file":
        (folder / "unet" / "extra.bin").write_bytes(b"x")
        return "unet/extra.bin"
    if kind == "symlink":
        target = folder.parent / "elsewhere.safetensors"
        target.write_bytes((folder / VAE).read_bytes())
        (folder / VAE).unlink()
        (folder / VAE).symlink_to(target)
        return VAE
    raise AssertionError(kind)


RULES = {
    "flip-unet": "sha256",
    "flip-vae": "sha256",
    "edit-config": "sha256",
    "edit-tokenizer": "sha256",
    "flip-keeping-mtime": "sha256",
    "truncate": "truncated",
    "delete": "missing",
    "extra-file": "not listed in manifest.json",
    "symlink": "not a regular file",
}


@pytest.mark.parametrize("kind", sorted(RULES))
def test_verify_folder_names_the_file_and_the_rule_for_every_kind_of_damage(
    kind: str, open_store: Callable[..., Store]
) -> None:
    store = open_store()
    folder = publish(store, "m").path
    assert verify_folder(folder) == []
    rel = _damage(folder, kind)
    problems = verify_folder(folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{rel}: ") and RULES[kind] in problems[0], problems
    assert "(" in problems[0], "the problem says which rule it broke"


def test_verify_folder_without_a_manifest_or_with_a_broken_one(tmp_path: Path) -> None:
    local = tmp_path / "local"
    _write_files(local, 3)
    assert verify_folder(local) == [], "an unmanaged local model is not checked"
    (local / MANIFEST).write_text("{not json")
    (problem,) = verify_folder(local)
    assert problem.startswith("manifest.json: ") and "malformed" in problem
    (local / MANIFEST).write_text(json.dumps({"format": 99}))
    (problem,) = verify_folder(local)
    assert problem.startswith("manifest.json: ") and "format" in problem


def test_unchanged_files_are_not_hashed_again(open_store: Callable[..., Store]) -> None:
    store = open_store()
    folder = publish(store, "m").path
    before = HASHES.hashed_bytes
    # Publishing hashed the files in staging; the published folder holds the same inodes.
    assert verify_folder(folder) == [] and verify_folder(folder) == []
    assert HASHES.hashed_bytes == before
    # A touched file (new mtime, same bytes) is hashed again, and only it.
    st = os.stat(folder / VAE)
    os.utime(folder / VAE, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert verify_folder(folder) == []
    assert HASHES.hashed_bytes == before + FILES[VAE]
    # The scrub reads everything again, whatever the cache holds.
    report = store.scrub()
    assert (report.checked, report.corrupt, report.bytes) == (1, 0, sum(FILES.values()))
    assert HASHES.hashed_bytes == before + FILES[VAE] + sum(FILES.values())


def test_a_variant_found_corrupt_is_marked_and_its_alias_goes_back_for_good(open_store: Callable[..., Store]) -> None:
    store = open_store()
    a, b = publish(store, "a", 1), publish(store, "b", 2)
    store.set_alias("prod", a)
    store.set_alias("prod", b)
    changes: list[Change] = []
    store.subscribe(changes.append)
    _flip(b.path / UNET)

    problems = store.check_variant(b.key)
    assert problems and problems[0].startswith(UNET)
    corrupted, moved = (c.event for c in changes)
    assert isinstance(corrupted, Corrupted) and corrupted.variant.state == CORRUPT and corrupted.problems
    assert isinstance(moved, AliasSet) and moved.reverted and moved.alias.key == a.key and UNET in moved.reason
    view = store.get(b.key)
    assert view is not None and view.state == CORRUPT and view.error.startswith(UNET)
    ((record, _),) = store.aliases()
    assert record.key == a.key and record.revert_to is None
    assert record.failure is not None and record.failure.target == b.key and record.failure.reverted
    with pytest.raises(errors.FailedPrecondition):
        store.set_alias("prod", store.variants("b")[0])

    # A restart agrees: the alias stays on a, the failure is still recorded, b is still corrupt.
    store = open_store()
    ((record, _),) = store.aliases()
    assert record.key == a.key and record.failure is not None and UNET in record.failure.reason
    assert [v.state for v in store.variants()] == [READY, CORRUPT]


def test_corrupt_at_start_moves_the_alias_back(open_store: Callable[..., Store]) -> None:
    store = open_store()
    a, b = publish(store, "a", 1), publish(store, "b", 2)
    store.set_alias("prod", a)
    store.set_alias("prod", b)
    _damage(b.path, "delete")
    store = open_store()
    ((record, target),) = store.aliases()
    assert record.key == a.key and target is not None and target.state == READY
    assert record.failure is not None and "missing" in record.failure.reason and record.failure.reverted


def test_the_scrub_marks_corrupt_variants(open_store: Callable[..., Store]) -> None:
    store = open_store()
    publish(store, "a", 1)
    b = publish(store, "b", 2)
    _flip(b.path / TEXT)
    report = store.scrub()
    assert (report.checked, report.corrupt) == (2, 1)
    assert {v.key.name: v.state for v in store.variants()} == {"a": READY, "b": CORRUPT}
    assert store.scrub().checked == 1, "corrupt variants stay corrupt until pulled or imported again"


def test_a_server_report_moves_the_alias_back_once(open_store: Callable[..., Store]) -> None:
    store = open_store()
    a, b = publish(store, "a", 1), publish(store, "b", 2)
    store.set_alias("prod", a)
    store.set_alias("prod", b)
    record, moved = store.report_failure("prod", b.key, "RuntimeError: size mismatch for conv_in.weight")
    assert moved and record.key == a.key
    assert record.failure is not None and "size mismatch" in record.failure.reason
    assert record.failure.reporter == "server"
    assert store.get(b.key) is not None and store.get(b.key).state == READY  # type: ignore[union-attr]
    # A stale report (the alias has moved on) changes nothing.
    again, moved = store.report_failure("prod", b.key, "late")
    assert not moved and again == record
    # a fails too: there is nothing left to go back to, so the alias stays and the failure is recorded.
    record, moved = store.report_failure("prod", a.key, "out of memory")
    assert not moved and record.key == a.key
    assert record.failure is not None and record.failure.target == a.key and not record.failure.reverted
    with pytest.raises(errors.NotFound):
        store.report_failure("nope", a.key, "x")
    # Persisted.
    store = open_store()
    ((record, _),) = store.aliases()
    assert record.key == a.key and record.failure is not None and "out of memory" in record.failure.reason


def test_leases_block_eviction_until_released_or_expired(open_store: Callable[..., Store], clock: Clock) -> None:
    size = sum(FILES.values())
    store = open_store(budget_bytes=int(size * 2.5))
    a, b = publish(store, "a", 1), publish(store, "b", 2)
    store.touch(b.key)  # a is the least recently used
    gone = VariantKey("gone", "0" * 16, "fp32")
    unknown, _ = store.renew_leases("server-1", [a.key, gone], 60)
    assert unknown == [gone]
    view = store.get(a.key)
    assert view is not None and view.lease_holders == 1 and view.lease_expires_at > time.time()
    assert store.lease_counts() == (1, 1)
    with store.reserve(size, "c") as evicted:
        assert [v.key for v in evicted] == [b.key], "the leased a must not be evicted"
    c = publish(store, "c", 3)

    # Every other variant leased too: nothing may be evicted.
    store.renew_leases("server-2", [c.key], 60)
    with pytest.raises(errors.ResourceExhausted) as err, store.reserve(size, "d"):
        pass
    assert "loaded by a server" in err.value.message

    # Leases survive a restart with a fresh term ...
    store = open_store(budget_bytes=int(size * 2.5))
    assert store.lease_counts() == (2, 2)
    # ... a released lease protects nothing ...
    store.renew_leases("server-2", [], 60)
    with store.reserve(size, "d") as evicted:
        assert [v.key for v in evicted] == [c.key]
    # ... and a server that stops renewing loses its lease when the term ends.
    clock.now += 61
    assert store.lease_counts() == (0, 0)
    with store.reserve(size * 2, "e") as evicted:
        assert [v.key for v in evicted] == [a.key]
