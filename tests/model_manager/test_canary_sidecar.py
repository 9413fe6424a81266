"""Canary aliases in the model-manager sidecar: the declared state's weighted aliases and SetAlias's `targets`,
validated field by field, kept across restarts, protecting their targets, and followed by a live server that splits
the requests naming the alias by request id; a failed canary target leaves the split and the others keep serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from model_manager.declared import DeclaredStateError, parse
from sdserve import Client
from sdserve.errors import SdserveError
from sdserve.models_cli import parse_weighted_targets
from service.aliases import pick
from tests.harness import serving, wait_until
from tests.model_manager.harness import Sidecar
from tests.model_manager.test_declared import ConfigMapVolume, _local, _yaml, aliases, passes


@pytest.fixture()
def volume(tmp_path: Path) -> ConfigMapVolume:
    return ConfigMapVolume(tmp_path / "declared")


def _problems(text: str) -> str:
    with pytest.raises(DeclaredStateError) as err:
        parse(text)
    return str(err.value)


def test_the_declared_canary_alias_is_validated_entry_by_entry(tiny_root: Path) -> None:
    models = [_local("a", tiny_root / "tiny-sd"), _local("b", tiny_root / "tiny-sd-old")]
    state = parse(_yaml(models, {"prod": {"a": 90, "b:fp32": 10}}))  # type: ignore[dict-item]
    (alias,) = state.aliases
    assert alias.weighted == (("a", "", 90), ("b", "fp32", 10))
    assert alias.models == ("a", "b") and alias.target == "a*90 | b:fp32*10"

    text = _problems(_yaml(models, {"one": {"a": 1}, "zero": {"a": 0, "b": 1}}))  # type: ignore[dict-item]
    assert "aliases.one: a canary alias maps two or more targets to weights" in text
    assert "aliases.zero.a: the weight must be a whole number from 1 to 1000000, got 0" in text
    text = _problems(_yaml(models, {"twice": {"a": 1, "a:fp32": 1}, "gone": {"a": 1, "c": 1}}))  # type: ignore[dict-item]
    assert "aliases.twice.a:fp32: 'a' is named twice" in text
    assert "aliases.gone.c: 'c' is not a model declared in this file" in text
    text = _problems(_yaml(models, {"frac": {"a": 1.5, "b": 1}, "flag": {"a": True, "b": 1}}))  # type: ignore[dict-item]
    assert "aliases.frac.a: the weight must be a whole number" in text
    assert "aliases.flag.a: the weight must be a whole number" in text


def test_the_cli_reads_weighted_targets() -> None:
    assert parse_weighted_targets(["a*90", "b@abc:fp16*10"]) == [("a", "", "", 90), ("b", "abc", "fp16", 10)]
    for bad in ("a", "a*0", "a*x"):
        with pytest.raises(SdserveError, match="NAME\\[@REVISION\\]\\[:VARIANT\\]\\*WEIGHT"):
            parse_weighted_targets([bad, "b*1"])


def test_set_alias_refuses_a_bad_split_naming_the_field(
    sidecars: Callable[..., Sidecar], tmp_path: Path, tiny_root: Path
) -> None:
    car = sidecars(tmp_path / "store", import_roots=[tiny_root], args=["--quality-check", "false"])
    with car.client() as c:
        for name in ("tiny-sd", "tiny-sd-old"):
            c.import_model(str(tiny_root / name), name=name)
        cases = {
            "targets: 2 to 16 targets, got 1": [("tiny-sd", "", "", 1)],
            "targets[1].weight: must be 1 to 1000000, got 0": [("tiny-sd", "", "", 1), ("tiny-sd-old", "", "", 0)],
            "targets[1].model: 'tiny-sd' is named twice": [("tiny-sd", "", "", 1), ("tiny-sd", "", "fp32", 1)],
        }
        for message, targets in cases.items():
            with pytest.raises(SdserveError) as err:
                c.set_alias("prod", targets=targets)
            assert err.value.code == "INVALID_ARGUMENT" and message in str(err.value)
        with pytest.raises(SdserveError) as err:
            c.set_alias("prod", "tiny-sd", targets=[("tiny-sd", "", "", 1), ("tiny-sd-old", "", "", 1)])
        assert "model: must be empty with targets" in str(err.value)
        with pytest.raises(SdserveError) as err:
            c.set_alias("prod", targets=[("tiny-sd", "", "", 1), ("missing", "", "", 1)])
        assert err.value.code == "NOT_FOUND" and "missing" in str(err.value)
        assert not c.list().aliases, "a refused split leaves no alias behind"

        alias, _ = c.set_alias("prod", targets=[("tiny-sd", "", "", 3), ("tiny-sd-old", "", "", 1)])
        assert [(t.model, t.weight) for t in alias.targets] == [("tiny-sd", 3), ("tiny-sd-old", 1)]
        assert all(Path(t.path).is_dir() for t in alias.targets)
        with pytest.raises(SdserveError) as err:
            c.delete("tiny-sd-old")
        assert err.value.code == "FAILED_PRECONDITION" and "alias 'prod'" in str(err.value)
    car.stop()
    again = sidecars(tmp_path / "store", import_roots=[tiny_root], args=["--quality-check", "false"])
    with again.client() as c:
        (kept,) = c.list().aliases
    assert [(t.model, t.weight) for t in kept.targets] == [("tiny-sd", 3), ("tiny-sd-old", 1)], "kept across restarts"


def test_a_server_splits_a_declared_canary_alias_by_request_id(
    tmp_path: Path, tiny_root: Path, sidecars: Callable[..., Sidecar], volume: ConfigMapVolume
) -> None:
    """The declared `prod: {a: 3, b: 1}` reaches the server: each request id gets the target `pick` gives it, the
    result names it and the alias; a failing canary target leaves the split (the alias serves the other only); a
    changed file turns the alias back into a plain one."""
    models = [_local("a", tiny_root / "tiny-sd"), _local("b", tiny_root / "tiny-sd-old")]
    volume.write(_yaml(models, {"default": "a", "prod": {"a": 3, "b": 1}}))  # type: ignore[dict-item]
    car = sidecars(
        tmp_path / "store",
        import_roots=[tiny_root],
        args=["--declared-state", str(volume.path), "--declared-poll-seconds", "0.1", "--quality-check", "false"],
    )
    wait_until(lambda: len(passes(car)) == 1, "the first pass to end", timeout=120)
    prod = aliases(car)["prod"]
    slots = {t.model: f"{t.model}@{t.revision}:{t.variant}" for t in prod.targets}
    split = ((slots["a"], 3), (slots["b"], 1))
    ids = [f"req-{i}" for i in range(16)]
    with (
        serving(tmp_path / "local", manager_target=car.target, default_model="", wait_for_default_seconds=120) as srv,
        Client(srv.target) as client,
    ):
        wait_until(lambda: "prod" in _canaries(client), "the server to follow the canary alias")
        got = {rid: client.generate("a red circle", model="prod", steps=1, seed=1, request_id=rid) for rid in ids}
        for rid, result in got.items():
            expected = "a" if pick(split, rid) == slots["a"] else "b"
            assert (result.parameters["model"], result.parameters["requested_model"]) == (expected, "prod"), rid
        assert {r.parameters["model"] for r in got.values()} == {"a", "b"}, "both targets serve"

        # A server that cannot serve the canary target reports it: it leaves the split, `a` serves every id.
        b = next(t for t in prod.targets if t.model == "b")
        with car.client() as c:
            now, moved = c.report_alias_failure("prod", "b", b.revision, b.variant, "test: b cannot serve")
        assert moved and not now.targets and now.model == "a" and now.last_failure is not None
        wait_until(lambda: "prod" not in _canaries(client), "the server to follow the reverted alias")
        assert {
            client.generate("x", model="prod", steps=1, seed=1, request_id=rid).parameters["model"] for rid in ids
        } == {"a"}

        # The declared file names a plain target again: the alias is plain on b.
        volume.write(_yaml(models, {"default": "a", "prod": "b"}))
        wait_until(lambda: aliases(car)["prod"].model == "b", "the alias to move")
        wait_until(
            lambda: client.generate("x", model="prod", steps=1, seed=1).parameters["model"] == "b", "the server to swap"
        )


def _canaries(client: Client) -> set[str]:
    """The aliases the server lists with more than one target (a canary alias is listed on each of its targets)."""
    models, _default = client.list_models()
    seen: dict[str, set[str]] = {}
    for m in models:
        for a in m.aliases:
            seen.setdefault(a, set()).add(m.name)
    return {a for a, names in seen.items() if len(names) > 1}
