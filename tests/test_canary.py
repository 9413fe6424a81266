"""Canary aliases: an alias with weighted targets (`prod=a*90|b*10`) sends each request to one target picked from its
request id (the same id always gets the same model), reports the target in Started and the result with the alias
as `requested_model`, and labels metrics by the target."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdserve import Client
from service.aliases import parse_weighted, pick
from service.tiny import build_tiny
from tests.harness import ServerThread, make_settings, running
from tests.test_batching import stream_result


def test_weighted_targets_parse_and_refuse_what_is_malformed() -> None:
    assert parse_weighted("a*90|b*10") == (("a", 90), ("b", 10))
    assert parse_weighted("s:fp16*1|s:int8*3") == (("s:fp16", 1), ("s:int8", 3))
    assert parse_weighted("plain") is None
    for bad, rule in (
        ("a*0|b*1", "whole weight of at least 1"),
        ("a*x|b*1", "whole weight of at least 1"),
        ("a|b", "NAME\\*WEIGHT"),
        ("a*1|a*2", "names a model twice"),
    ):
        with pytest.raises(ValueError, match=rule):
            parse_weighted(bad)


def test_a_bad_canary_alias_setting_names_the_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.settings import Settings

    with pytest.raises(SystemExit):
        Settings.from_sources(["--aliases", "prod=a*90|b*0"], {})
    assert "alias 'prod': weighted target 'b*0'" in capsys.readouterr().err
    assert make_settings(tmp_path, aliases=(("prod", "a*90|b*10"),)).aliases == (("prod", "a*90|b*10"),)


def test_ids_spread_in_proportion_and_each_id_always_picks_the_same_target() -> None:
    targets = (("a", 90), ("b", 10))
    picks = Counter(pick(targets, f"request-{i}") for i in range(4000))
    assert 0.08 < picks["b"] / 4000 < 0.12
    assert all(pick(targets, f"request-{i}") == pick(targets, f"request-{i}") for i in range(100))
    assert {pick((("a", 1), ("b", 1)), f"r{i}") for i in range(50)} == {"a", "b"}


@pytest.fixture(scope="module")
def canary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = tmp_path_factory.mktemp("canary-models")
    build_tiny(models / "stable", seed=0)
    build_tiny(models / "candidate", seed=1)
    aliases = (("prod", "stable*50|candidate*50"),)
    yield from running(models, default_model="stable", aliases=aliases, calibrate_batching=False, metrics_port=0)


def test_each_request_is_served_by_the_target_its_id_picks(canary: ServerThread) -> None:
    targets = (("stable", 50), ("candidate", 50))
    seen = set()
    with Client(canary.target) as c:
        for i in range(6):
            rid = f"canary-{i}"
            started, result = stream_result(c.stream_generate("a red circle", model="prod", steps=1, request_id=rid))
            assert started.model == result.parameters["model"] == pick(targets, rid)
            assert started.requested_model == result.parameters["requested_model"] == "prod"
            seen.add(started.model)
            again = c.generate("a red circle", model="prod", steps=1, request_id=rid)
            assert again.parameters["model"] == started.model, "one id always gets the same model"
        plain = c.generate("a red circle", steps=1)
    assert seen == {"stable", "candidate"}, "the six ids were chosen to reach both targets"
    assert plain.parameters["requested_model"] == "stable"
    assert canary.server is not None
    registry = canary.server.metrics.registry
    for model in seen:
        labels = {"rpc": "Generate", "model": model, "variant": "fp32", "task": "generate", "outcome": "ok"}
        assert (registry.get_sample_value("sdserve_requests_total", {**labels, "transport": "grpc"}) or 0) >= 2


def test_list_models_shows_the_canary_alias_on_each_target(canary: ServerThread) -> None:
    with Client(canary.target) as c:
        listed, _default = c.list_models()
        models = {m.name: m for m in listed}
    assert "prod" in models["stable"].aliases and "prod" in models["candidate"].aliases
