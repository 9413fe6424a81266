"""The Python client's adapters without a server: the `adapters` option to AdapterRef messages and its checks,
ResolvedAdapter in Started and the result, AdapterInfo and limits.max_adapters from GetServerInfo."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from sdserve import (
    AdapterInfo,
    AdapterSpec,
    AsyncClient,
    Client,
    ResolvedAdapter,
    Result,
    Started,
    _convert,
)
from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc

SHA = "ab" * 32


def _refs(spec: AdapterSpec) -> list[tuple[str, float | None]]:
    p = _convert.params("a cat", {"adapters": spec})
    return [(a.name, a.scale if a.HasField("scale") else None) for a in p.adapters]


def test_no_adapters_by_default() -> None:
    assert list(_convert.params("a cat", {"steps": 3}).adapters) == []
    assert list(_convert.params("a cat", {"adapters": []}).adapters) == []
    assert list(_convert.params("a cat", {"adapters": {}}).adapters) == []


def test_names_pairs_and_mappings() -> None:
    # A plain name leaves the scale unset: the server's default, 1.
    assert _refs(["pink"]) == [("pink", None)]
    assert _refs([("pink", 0.5), "cyan", ("x", None)]) == [("pink", 0.5), ("cyan", None), ("x", None)]
    assert _refs({"pink": -1.0, "cyan": 4, "x": None}) == [("pink", -1.0), ("cyan", 4.0), ("x", None)]
    assert _refs((["pink", 2],)) == [("pink", 2.0)]  # type: ignore[arg-type]  # a list pair is a pair too
    # Order is kept; the bounds are inclusive and 0 is a value, not "unset".
    assert _refs([("b", -4.0), ("a", 4.0), ("c", 0.0)]) == [("b", -4.0), ("a", 4.0), ("c", 0.0)]


def test_adapters_on_edit_and_inpaint() -> None:
    req = _convert.edit_request(b"img", "x", {"strength": 0.5, "adapters": [("pink", 0.75)]})
    assert [(a.name, a.scale) for a in req.params.adapters] == [("pink", 0.75)]
    assert req.strength == pytest.approx(0.5)
    ireq = _convert.inpaint_request(b"img", b"mask", "x", {"mask_blur": 2, "adapters": {"cyan": 1.5}})
    assert [(a.name, a.scale) for a in ireq.params.adapters] == [("cyan", 1.5)]


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ([""], "adapters[0].name", "must not be empty"),
        (["ok", "  "], "adapters[1].name", "must not be empty"),
        ({"": 1.0}, "adapters[0].name", "must not be empty"),
        (["a", ("b", 1.0), ("a", 0.5)], "adapters[2].name", "'a' is already adapters[0]"),
        ([("a", 4.01)], "adapters[0].scale", "from -4 to 4"),
        ([("a", 1.0), ("b", -5)], "adapters[1].scale", "from -4 to 4"),
        ({"a": math.nan}, "adapters[0].scale", "finite"),
        ({"a": math.inf}, "adapters[0].scale", "finite"),
        ([("a", -math.inf)], "adapters[0].scale", "finite"),
        ([("a", 1.0, 2.0)], "adapters[0]", "(name, scale) pair"),
        ([("a",)], "adapters[0]", "(name, scale) pair"),
    ],
)
def test_bad_adapters_raise_value_error_naming_the_field(spec: Any, field: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]") + ": ") as info:
        _convert.params("a cat", {"adapters": spec})
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("pink", "adapters: "),  # a str is not a list of names
        ([3], "adapters[0].name: "),
        ([("a", "1.0")], "adapters[0].scale: "),
        ([("a", True)], "adapters[0].scale: "),
    ],
)
def test_wrong_types_raise_type_error_naming_the_field(spec: Any, field: str) -> None:
    with pytest.raises(TypeError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]")):
        _convert.params("a cat", {"adapters": spec})


LORA = pb.ResolvedAdapter(name="pink", kind=pb.ADAPTER_KIND_LORA, scale=0.5, sha256=SHA)
EMBEDDING = pb.ResolvedAdapter(name="ti", kind=pb.ADAPTER_KIND_TEXTUAL_INVERSION, scale=1.0, sha256=SHA, token="<ti>")


def test_started_and_result_carry_typed_adapters() -> None:
    started = _convert.event(pb.GenerateResponse(started=pb.StartedEvent(model="m", adapters=[LORA, EMBEDDING])))
    assert isinstance(started, Started)
    expected = (
        ResolvedAdapter(name="pink", kind="lora", scale=0.5, sha256=SHA, token=""),
        ResolvedAdapter(name="ti", kind="textual_inversion", scale=1.0, sha256=SHA, token="<ti>"),
    )
    assert started.adapters == expected
    params = pb.ResolvedParameters(model="m", adapters=[LORA, EMBEDDING])
    result = _convert.event(pb.GenerateResponse(result=pb.ResultEvent(parameters=params)))
    assert isinstance(result, Result)
    assert result.adapters == expected
    # The JSON parameters hold them too.
    assert result.parameters["adapters"] == [
        {"name": "pink", "kind": "ADAPTER_KIND_LORA", "scale": 0.5, "sha256": SHA},
        {"name": "ti", "kind": "ADAPTER_KIND_TEXTUAL_INVERSION", "scale": 1.0, "sha256": SHA, "token": "<ti>"},
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        expected[0].scale = 2.0  # type: ignore[misc]


def test_events_without_adapters_and_unknown_kinds() -> None:
    started = _convert.event(pb.GenerateResponse(started=pb.StartedEvent(model="m")))
    result = _convert.event(pb.GenerateResponse(result=pb.ResultEvent(parameters=pb.ResolvedParameters())))
    assert isinstance(started, Started) and started.adapters == ()
    assert isinstance(result, Result) and result.adapters == ()
    odd = pb.ResolvedAdapter(name="x", kind=pb.ADAPTER_KIND_UNSPECIFIED)
    ev = _convert.event(pb.GenerateResponse(started=pb.StartedEvent(adapters=[odd])))
    assert isinstance(ev, Started) and ev.adapters[0].kind == ""


INFO = pb.GetServerInfoResponse(
    version="1",
    limits=pb.Limits(max_adapters=8),
    adapters=[
        pb.AdapterInfo(
            name="pink",
            kind=pb.ADAPTER_KIND_LORA,
            family="sd15",
            base="cross_attention_dim=768",
            sha256=SHA,
            size_bytes=1234,
            targets=["unet", "text_encoder"],
            loaded_in=["shapes"],
        ),
        pb.AdapterInfo(name="ti", kind=pb.ADAPTER_KIND_TEXTUAL_INVERSION, family="sd15", token="<ti>", sha256=SHA),
    ],
)
EXPECTED_INFO = [
    AdapterInfo(
        name="pink",
        kind="lora",
        family="sd15",
        base="cross_attention_dim=768",
        token="",
        sha256=SHA,
        size_bytes=1234,
        targets=("unet", "text_encoder"),
        loaded_in=("shapes",),
    ),
    AdapterInfo(
        name="ti",
        kind="textual_inversion",
        family="sd15",
        base="",
        token="<ti>",
        sha256=SHA,
        size_bytes=0,
        targets=(),
        loaded_in=(),
    ),
]


class _Info(pb_grpc.DiffusionServiceServicer):
    """Answers GetServerInfo with INFO and records each Generate request it is sent (then fails it)."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []

    def GetServerInfo(self, request: Any, context: Any) -> pb.GetServerInfoResponse:
        return INFO

    def Generate(self, request: pb.GenerateRequest, context: Any) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        context.abort(grpc.StatusCode.UNAVAILABLE, "test servicer")
        yield pb.GenerateResponse()


@pytest.fixture()
def fake() -> Iterator[tuple[str, _Info]]:
    servicer = _Info()  # type: ignore[abstract]  # only the RPCs the tests call
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DiffusionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def test_list_adapters_sync_and_async(fake: tuple[str, _Info]) -> None:
    target, _ = fake
    with Client(target) as c:
        adapters, most = c.list_adapters()
        assert c.server_info().limits.max_adapters == 8

    async def run() -> tuple[list[AdapterInfo], int, int]:
        async with AsyncClient(target) as ac:
            info = await ac.server_info()
            found, limit = await ac.list_adapters()
            return found, limit, len(info.adapters)

    async_adapters, async_most, count = asyncio.run(run())
    assert (adapters, most) == (EXPECTED_INFO, 8)
    assert (async_adapters, async_most, count) == (EXPECTED_INFO, 8, 2)


def test_clients_send_adapters_and_check_them_before_the_call(fake: tuple[str, _Info]) -> None:
    target, servicer = fake
    with Client(target) as c:
        with pytest.raises(ValueError, match=r"adapters\[1\]\.name"):
            c.generate("x", adapters=["a", "a"])
        with pytest.raises(Exception, match="UNAVAILABLE"):
            c.generate("x", adapters={"pink": 0.25})

    async def run() -> None:
        async with AsyncClient(target) as ac:
            with pytest.raises(ValueError, match=r"adapters\[0\]\.scale"):
                await ac.generate("x", adapters=[("pink", 9.0)])
            with pytest.raises(Exception, match="UNAVAILABLE"):
                await ac.generate("x", adapters=["cyan"])

    asyncio.run(run())
    # Only the valid requests reached the server.
    sent = [[(a.name, a.scale if a.HasField("scale") else None) for a in r.params.adapters] for r in servicer.requests]
    assert sent == [[("pink", 0.25)], [("cyan", None)]]
