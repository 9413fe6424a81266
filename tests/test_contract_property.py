"""Property: whatever a client sends, DiffusionService answers with a result or a documented error, never INTERNAL."""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from tests.harness import TINY, TINY_INPAINT, ServerThread, running, sample_image

# Each call is bounded: a request that would run longer ends DEADLINE_EXCEEDED, which the contract allows.
CALL_SECONDS = 5.0
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# derandomize: the same examples on every run, so a failure here is a bug, not bad luck. The example counts keep the
# module within about half a minute on two cores; a wider search is the same strategies, more examples, random seeds.
PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
U32 = 2**32 - 1


@pytest.fixture(scope="module")
def contract_server(models_dir: Path) -> Iterator[ServerThread]:
    """One server for the whole module, so what one example does to it is seen by the next. Start-up batch
    calibration is off (it only times batch sizes), and torch runs one thread: tiny models gain nothing from more,
    and on a busy two-core machine more threads wait on each other. The thread count is put back afterwards."""
    threads = torch.get_num_threads()
    try:
        yield from running(models_dir, calibrate_batching=False, torch_threads=1)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stub(contract_server: ServerThread) -> Iterator[pb_grpc.DiffusionServiceStub]:
    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(contract_server.target, options=opts) as ch:
        yield pb_grpc.DiffusionServiceStub(ch)


# ---- what came back -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str
    violations: tuple[tuple[str, str], ...]
    images: int


def answer(call: Callable[..., Any], request: Any, timeout: float = CALL_SECONDS) -> Answer:
    """Runs one streaming call to its end and reports the status, the BadRequest violations and the result's images."""
    images = 0
    try:
        for event in call(request, timeout=timeout):
            if event.HasField("result"):
                images = len(event.result.images)
    except grpc.RpcError as err:
        return Answer(err.code(), err.details() or "", bad_request(err), images)
    return Answer(grpc.StatusCode.OK, "", (), images)


def bad_request(err: grpc.RpcError) -> tuple[tuple[str, str], ...]:
    trailers: Any = err.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return tuple((v.field, v.description) for v in bad.field_violations)
    return ()


def resolves(path: str, desc: Descriptor) -> bool:
    """Whether `params.width`-style `path` names a field of the request message (`request` names the whole)."""
    if path == "request":
        return True
    *parents, leaf = path.split(".")
    for part in parents:
        field = desc.fields_by_name.get(part)
        if field is None or field.message_type is None:
            return False
        desc = field.message_type
    return leaf in desc.fields_by_name


def check_contract(a: Answer, req: Any, stub: pb_grpc.DiffusionServiceStub | None = None) -> None:
    """OK with a result, or a documented code (INVALID_ARGUMENT naming fields of `req`); after an error, `stub`'s
    server must still run a good request (an OK answer has just shown that it does)."""
    desc: Descriptor = req.DESCRIPTOR
    if a.code == grpc.StatusCode.OK:
        assert a.images == (req.params.num_images or 1), f"OK with {a.images} images"
        return
    assert a.code in DOCUMENTED, f"{a.code.name}: {a.details}"
    if a.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert a.violations, f"INVALID_ARGUMENT without field violations: {a.details}"
        for field, description in a.violations:
            assert resolves(field, desc), f"violation names no field of {desc.name}: {field!r}"
            assert description, field
    if stub is not None:
        check_still_serving(stub)


def check_still_serving(stub: pb_grpc.DiffusionServiceStub) -> None:
    params = pb.GenerationParams(prompt="ok", width=8, height=8, steps=1, seed=1, guidance_scale=0.0)
    good = pb.GenerateRequest(params=params)
    a = answer(stub.Generate, good, timeout=120)
    assert (a.code, a.images) == (grpc.StatusCode.OK, 1), a


# ---- inputs ---------------------------------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` with no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def _orientation(img: Image.Image, value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return _encode(img, "JPEG", exif=exif.tobytes())


ENCODINGS: dict[str, Callable[[Image.Image], bytes]] = {
    "png": lambda img: _encode(img, "PNG"),
    "jpeg": lambda img: _encode(img, "JPEG"),
    "webp": lambda img: _encode(img, "WEBP"),
    "png16": lambda img: _encode(Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257), "PNG"),
    "palette": lambda img: _encode(img.convert("P"), "PNG"),
    "palette-transparent": lambda img: _encode(img.convert("P"), "PNG", transparency=0),
    "rgba": lambda img: _encode(img.convert("RGBA"), "PNG"),
    "la": lambda img: _encode(img.convert("LA"), "PNG"),
    "one-bit": lambda img: _encode(img.convert("1"), "PNG"),
    "cmyk-jpeg": lambda img: _encode(img.convert("CMYK"), "JPEG"),
    "exif-rotated": lambda img: _orientation(img, 6),
    "exif-bad-orientation": lambda img: _orientation(img, 99),
    "gif": lambda img: _encode(img, "GIF"),
    "bmp": lambda img: _encode(img, "BMP"),
    "truncated-png": lambda img: _encode(img, "PNG")[: max(8, len(_encode(img, "PNG")) // 2)],
}
# Valid images the pipeline runs on (thin ones included); the others break a size rule.
SIZES = [(8, 8), (16, 16), (16, 16), (32, 16), (16, 24), (8, 64), (64, 8), (8, 256), (256, 8), (8, 1024)]
ODD_SIZES = [(60, 64), (4, 4), (8, 4104), (2056, 8)]
DECODABLE = ["png", "jpeg", "webp", "png16", "palette", "palette-transparent", "rgba", "la", "one-bit", "cmyk-jpeg"]


@functools.lru_cache(maxsize=512)
def encoded(kind: str, width: int, height: int, content: str = "sample") -> bytes:
    """`content` ("sample", "white", "black", "grey", "box") drawn at width x height, encoded as `kind`."""
    if content == "sample":
        img = sample_image(width, height)
    else:
        level = {"white": 255, "black": 0, "grey": 128}.get(content, 0)
        img = Image.new("RGB", (width, height), (level,) * 3)
        if content == "box":
            box = (width // 4, height // 4, max(width // 4 + 1, width // 2), max(height // 4 + 1, height // 2))
            img.paste((255, 255, 255), box)
    return ENCODINGS[kind](img)


# Each request is valid and small except for up to two fields, drawn from their wild values: so examples both
# run the pipeline and probe one rule at a time (with every field wild at once, all would end INVALID_ARGUMENT).
U32S = st.sampled_from([0, 1, 7, 12, 2056, 4096, 2**31, U32])
FLOATS = st.one_of(
    st.floats(width=32),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, -1.0, 1e-8, 1e30, 50.0, 50.5, 1.0, 0.0]),
)
TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["p" * 2000, "p" * 2001, "\x00", "🖼️ ünï", "a " * 300]))
WILD_STEPS = [0, 1, 4, 51, 60, 150, 151, U32]
ENUMS = st.sampled_from([-1, 4, 12, 99, 2**31 - 1])


def _field(draw: st.DrawFn, wild: frozenset[str], name: str, tame: st.SearchStrategy[Any], odd: Any) -> Any:
    return draw(odd if name in wild else tame)


def _wild(draw: st.DrawFn, names: list[str]) -> frozenset[str]:
    return frozenset(draw(st.sets(st.sampled_from(names), max_size=2)))


PARAM_FIELDS = [
    "model", "prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "scheduler", "seed",
    "num_images", "clip_skip", "request_id", "max_queue_seconds", "preview.mode", "preview.every_n_steps",
    "preview.max_edge", "preview.format", "preview.quality", "output.format", "output.quality",
]  # fmt: skip


@st.composite
def generation_params(draw: st.DrawFn, size: tuple[int, int] = (0, 0), wild: frozenset[str] = frozenset()) -> Any:
    """Every field of GenerationParams; those named in `wild` out of range, NaN, unknown enums and the like."""
    f = functools.partial(_field, draw, wild)
    # 0 means the model's default (64x64: slow here) for Generate and Inpaint's MASK_ONLY, else the image's size.
    tame_w, tame_h = (draw(st.sampled_from([8, 16])),) * 2 if size == (0, 0) else draw(st.sampled_from([(0, 0), size]))
    p = pb.GenerationParams(
        model=f("model", st.sampled_from(["", TINY]), st.sampled_from([TINY_INPAINT, "no-such", "x" * 201, "../x"])),
        prompt=f("prompt", st.text(max_size=8), TEXT),
        negative_prompt=f("negative_prompt", st.just(""), TEXT),
        width=f("width", st.just(tame_w), st.one_of(U32S, st.sampled_from([0, 8, 64, *size]))),
        height=f("height", st.just(tame_h), st.one_of(U32S, st.sampled_from([0, 8, 64, *size]))),
        # Edit and Inpaint run steps x strength of them, which must come to at least 1.
        steps=f("steps", st.sampled_from([1, 2, 3] if size == (0, 0) else [2, 3]), st.sampled_from(WILD_STEPS)),
        scheduler=f("scheduler", st.integers(0, 11), st.one_of(ENUMS, st.integers(0, 11))),
        num_images=f("num_images", st.sampled_from([0, 1, 1, 2]), st.sampled_from([4, 5, U32])),
        clip_skip=f("clip_skip", st.sampled_from([0, 0, 1]), st.sampled_from([2, 3, 11, 12, 48, 49, U32])),
        request_id=f("request_id", st.just(""), st.sampled_from(["bad\nid", "é", "r" * 128, "r" * 129, " "])),
        max_queue_seconds=f(
            "max_queue_seconds",
            st.sampled_from([0.0, 30.0]),
            st.sampled_from([1e-9, -1.0, -0.0, float("nan"), float("inf"), 86400.0, 86401.0]),
        ),
        preview=pb.PreviewOptions(
            mode=f("preview.mode", st.sampled_from([0, 0, 1, 2, 3]), ENUMS),
            every_n_steps=f("preview.every_n_steps", st.sampled_from([0, 1, 2]), st.sampled_from([1000, 1001, U32])),
            max_edge=f("preview.max_edge", st.sampled_from([0, 16, 32]), st.sampled_from([1, 15, 2048, 2049, U32])),
            format=f("preview.format", st.sampled_from([0, 2, 3]), st.one_of(ENUMS, st.just(1))),
            quality=f("preview.quality", st.sampled_from([0, 1, 75, 100]), st.sampled_from([101, U32])),
        ),
        output=pb.OutputOptions(
            format=f("output.format", st.sampled_from([0, 1, 2, 3]), ENUMS),
            quality=f("output.quality", st.sampled_from([0, 1, 90, 100]), st.sampled_from([101, U32])),
        ),
    )
    embed = draw(st.sampled_from([None, True, False]))
    if embed is not None:
        p.output.embed_parameters = embed
    guidance = f("guidance_scale", st.sampled_from([0.0, 1.0, 1.0, None, 7.5]), FLOATS)
    if guidance is not None:
        p.guidance_scale = guidance
    seed = draw(st.one_of(st.none(), st.sampled_from([0, 1, 2**63, 2**64 - 1])))
    if seed is not None:
        p.seed = seed
    return p


@st.composite
def image_bytes(draw: st.DrawFn, odd: bool, content: str = "sample") -> tuple[bytes, tuple[int, int]]:
    """Encoded image bytes and the width and height they show; `odd` ones break a rule or are no image at all."""
    if not odd:
        w, h = draw(st.sampled_from(SIZES))
        kind = draw(st.sampled_from(["png", "png", *DECODABLE, "exif-rotated", "exif-bad-orientation"]))
        return encoded(kind, w, h, content), ((h, w) if kind == "exif-rotated" else (w, h))
    case = draw(st.sampled_from(["odd-size", "garbage", "empty", "bomb", "format"]))
    if case == "garbage":
        return draw(st.binary(min_size=1, max_size=64)), (0, 0)
    if case == "empty":
        return b"", (0, 0)
    if case == "bomb":
        w, h = draw(st.sampled_from([(5000, 5000), (50000, 50000), (2**31 - 1, 1), (8, 4096 * 4096 // 8 + 8)]))
        return bomb_png(w, h), (w, h)
    if case == "format":
        kind = draw(st.sampled_from(["gif", "bmp", "truncated-png"]))
        return encoded(kind, 16, 16, content), (16, 16)
    w, h = draw(st.sampled_from(ODD_SIZES))
    return encoded(draw(st.sampled_from(DECODABLE)), w, h, content), (w, h)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    return pb.GenerateRequest(params=draw(generation_params(wild=_wild(draw, PARAM_FIELDS))))


@st.composite
def edit_requests(draw: st.DrawFn) -> pb.EditRequest:
    wild = _wild(draw, [*PARAM_FIELDS, "image", "strength"])
    image, size = draw(image_bytes("image" in wild))
    req = pb.EditRequest(params=draw(generation_params(size, wild)), image=image)
    strength = _field(draw, wild, "strength", st.sampled_from([None, 0.5, 0.75, 1.0]), FLOATS)
    if strength is not None:
        req.strength = strength
    return req


@st.composite
def inpaint_requests(draw: st.DrawFn) -> pb.InpaintRequest:
    names = [*PARAM_FIELDS, "image", "mask", "mask_blur", "strength", "area", "mask_padding"]
    wild = _wild(draw, names)
    f = functools.partial(_field, draw, wild)
    image, size = draw(image_bytes("image" in wild))
    invert = draw(st.booleans())
    tame_content = ["box"] if invert else ["white", "box", "box", "grey"]
    content = draw(st.sampled_from(tame_content if "mask" not in wild else ["black", "white", "sample"]))
    if "mask" not in wild and size != (0, 0) and max(size) <= 4096:
        # A mask of the image's shown size: stored sideways when its EXIF says to turn it.
        kind = draw(st.sampled_from(["png", "png", "png16", "la", "palette", "jpeg", "one-bit", "exif-rotated"]))
        w, h = size if kind != "exif-rotated" else size[::-1]
        mask = encoded(kind, w, h, content)
    else:
        mask, _ = draw(image_bytes(draw(st.booleans()), content))
    req = pb.InpaintRequest(
        params=draw(generation_params(size, wild)),
        image=image,
        mask=mask,
        mask_blur=f("mask_blur", st.sampled_from([0, 0, 4, 64]), st.sampled_from([65, U32])),
        invert_mask=invert,
        area=f("area", st.sampled_from([0, 1, 2, 2]), ENUMS),
        preserve_unmasked=draw(st.booleans()),
    )
    padding = f("mask_padding", st.sampled_from([None, 0, 32, 1024]), st.sampled_from([1025, U32]))
    if padding is not None:
        req.mask_padding = padding
    strength = f("strength", st.sampled_from([None, 0.5, 1.0]), FLOATS)
    if strength is not None:
        req.strength = strength
    return req


def small(**fields: Any) -> pb.GenerationParams:
    return pb.GenerationParams(**{"prompt": "x", "steps": 2, "seed": 3, **fields})


# ---- the properties -------------------------------------------------------------------------------------------------


@settings(PROPERTY, max_examples=100)
@example(pb.GenerateRequest(params=small(width=16, height=16, clip_skip=1)))
@example(pb.GenerateRequest(params=small(width=8, height=8, scheduler=pb.SCHEDULER_LCM, steps=51)))
@given(generate_requests())
def test_generate_answers_within_the_contract(stub: pb_grpc.DiffusionServiceStub, req: pb.GenerateRequest) -> None:
    check_contract(answer(stub.Generate, req), req, stub)


@settings(PROPERTY, max_examples=100)
@example(pb.EditRequest(params=small(steps=10), image=encoded("png", 16, 16), strength=0.1))  # 10 x 0.1f = 1?
@example(pb.EditRequest(params=small(), image=encoded("png16", 16, 16), strength=1e-8))
@given(edit_requests())
def test_edit_answers_within_the_contract(stub: pb_grpc.DiffusionServiceStub, req: pb.EditRequest) -> None:
    check_contract(answer(stub.Edit, req), req, stub)


@settings(PROPERTY, max_examples=120)
@example(
    pb.InpaintRequest(
        params=small(),
        image=encoded("png", 8, 1024),
        mask=encoded("png", 8, 1024, "white"),
        area=pb.INPAINT_AREA_MASK_ONLY,
    )
)
@given(inpaint_requests())
def test_inpaint_answers_within_the_contract(stub: pb_grpc.DiffusionServiceStub, req: pb.InpaintRequest) -> None:
    check_contract(answer(stub.Inpaint, req), req, stub)


# ---- bytes no generated client would send ---------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand so any bytes can go in."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def raw_call(server: ServerThread, rpc: str, body: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(server.target) as ch:
        # No serializers: the bytes go out as they are, and come back undecoded.
        call = ch.unary_stream(f"/sdserve.v1.DiffusionService/{rpc}", None, None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(body, timeout=30))
    return info.value


NOT_UTF8 = b"caf\xc3 \xff\xfe"


@pytest.mark.parametrize(
    ("rpc", "body", "field"),
    [
        ("Generate", _wire_field(1, _wire_field(2, NOT_UTF8)), "params.prompt"),
        ("Generate", _wire_field(1, _wire_field(3, NOT_UTF8)), "params.negative_prompt"),
        ("Edit", _wire_field(1, _wire_field(1, NOT_UTF8)) + _wire_field(2, b"png"), "params.model"),
        ("Inpaint", _wire_field(1, _wire_field(14, NOT_UTF8)), "params.request_id"),
    ],
    ids=["generate-prompt", "generate-negative-prompt", "edit-model", "inpaint-request-id"],
)
def test_invalid_utf8_names_the_field(
    contract_server: ServerThread, stub: pb_grpc.DiffusionServiceStub, rpc: str, body: bytes, field: str
) -> None:
    err = raw_call(contract_server, rpc, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert field in {name for name, _ in bad_request(err)}
    check_still_serving(stub)


def test_malformed_wire_format_is_invalid_argument(
    contract_server: ServerThread, stub: pb_grpc.DiffusionServiceStub
) -> None:
    err = raw_call(contract_server, "Generate", b"\x0a\xff\xff\xff\xff\x0f")  # params claims ~4 GiB of payload
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert bad_request(err)
    check_still_serving(stub)
