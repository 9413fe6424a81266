"""Every validation rule answers INVALID_ARGUMENT (or NOT_FOUND / FAILED_PRECONDITION) naming the field."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from sdserve import Client, SdserveError
from sdserve.v1 import diffusion_pb2 as pb
from sdserve.v1 import diffusion_pb2_grpc as pb_grpc
from tests.harness import TINY_INPAINT, ServerThread, png, sample_image, sample_mask

IMAGE = png(sample_image())
MASK = png(sample_mask())


def expect(call: Any, code: str, field: str, words: str = "") -> SdserveError:
    with pytest.raises(SdserveError) as info:
        call()
    err = info.value
    assert err.code == code, err
    if field:
        fields = {v.field: v.description for v in err.violations}
        assert field in fields, f"{field} not in {fields}"
        assert words in fields[field]
    return err


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge size with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"width": 100}, "params.width", "multiple of 8"),
        ({"height": 4096}, "params.height", "between"),
        ({"steps": 151}, "params.steps", "between 0 and 150"),
        ({"guidance_scale": 51.0}, "params.guidance_scale", "[0, 50]"),
        ({"guidance_scale": -1.0}, "params.guidance_scale", "[0, 50]"),
        ({"num_images": 5}, "params.num_images", "between 0 and 4"),
        ({"negative_prompt": "x" * 2001}, "params.negative_prompt", "at most 2000"),
        ({"request_id": "bad\nid"}, "params.request_id", "printable"),
        ({"output_quality": 101}, "params.output.quality", "between 0 and 100"),
        ({"max_queue_seconds": -1.0}, "params.max_queue_seconds", "between"),
        ({"clip_skip": 3}, "params.clip_skip", "depth"),
    ],
)
def test_generate_rules(client: Client, options: dict[str, Any], field: str, words: str) -> None:
    expect(lambda: client.generate("ok", **options), "INVALID_ARGUMENT", field, words)


def test_overlong_prompt(client: Client) -> None:
    expect(lambda: client.generate("p" * 2001), "INVALID_ARGUMENT", "params.prompt", "at most 2000 characters")


def test_all_violations_reported_together(client: Client) -> None:
    err = expect(lambda: client.generate("ok", width=13, steps=1000), "INVALID_ARGUMENT", "params.width")
    assert {v.field for v in err.violations} == {"params.width", "params.steps"}


def test_raw_status_details_carry_bad_request(server: ServerThread) -> None:
    """Clients without our wrapper read the same violations from grpc-status-details-bin."""
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(params=pb.GenerationParams(width=12))))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers: Any = err.trailing_metadata()
    details = next(item[1] for item in trailers if item[0] == "grpc-status-details-bin")
    status = status_pb2.Status.FromString(details)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "params.width"


def test_preview_png_refused(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        params = pb.GenerationParams(
            preview=pb.PreviewOptions(mode=pb.PREVIEW_MODE_LATENT_RGB, format=pb.IMAGE_FORMAT_PNG)
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(params=params)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.preview.format" in (info.value.details() or "")


def test_unknown_scheduler_enum_value(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DiffusionServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(params=pb.GenerationParams(scheduler=99))))  # type: ignore[arg-type]
    assert "params.scheduler" in (info.value.details() or "")


def test_undecodable_image(client: Client) -> None:
    expect(lambda: client.edit(b"not an image", "x"), "INVALID_ARGUMENT", "image", "decodable")


def test_missing_image(client: Client) -> None:
    expect(lambda: client.edit(b"", "x"), "INVALID_ARGUMENT", "image", "required")


def test_image_not_multiple_of_8(client: Client) -> None:
    expect(lambda: client.edit(png(sample_image(60, 64)), "x"), "INVALID_ARGUMENT", "image", "multiple of 8")


@pytest.mark.parametrize("side", [5000, 50000])
def test_decompression_bomb_refused_before_decoding(client: Client, side: int) -> None:
    expect(lambda: client.edit(bomb_png(side, side), "x"), "INVALID_ARGUMENT", "image", "the limit")


def test_edit_size_must_match_image(client: Client) -> None:
    expect(lambda: client.edit(IMAGE, "x", width=128), "INVALID_ARGUMENT", "params.width", "input image's width")


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2])
def test_strength_range(client: Client, strength: float) -> None:
    expect(lambda: client.edit(IMAGE, "x", strength=strength), "INVALID_ARGUMENT", "strength", "(0, 1]")


def test_steps_times_strength_at_least_one(client: Client) -> None:
    expect(lambda: client.edit(IMAGE, "x", strength=0.1, steps=5), "INVALID_ARGUMENT", "params.steps", "x strength")


def test_mask_missing(client: Client) -> None:
    expect(lambda: client.inpaint(IMAGE, b"", "x"), "INVALID_ARGUMENT", "mask", "required")


def test_mask_size_differs(client: Client) -> None:
    expect(lambda: client.inpaint(IMAGE, png(sample_mask(32, 32)), "x"), "INVALID_ARGUMENT", "mask", "same size")


def test_mask_without_white(client: Client) -> None:
    black = png(Image.new("L", (64, 64), 0))
    expect(lambda: client.inpaint(IMAGE, black, "x"), "INVALID_ARGUMENT", "mask", "nothing to repaint")


def test_mask_blur_range(client: Client) -> None:
    expect(lambda: client.inpaint(IMAGE, MASK, "x", mask_blur=65), "INVALID_ARGUMENT", "mask_blur", "between 0 and 64")


def test_mask_padding_range(client: Client) -> None:
    expect(
        lambda: client.inpaint(IMAGE, MASK, "x", area="mask_only", mask_padding=5000),
        "INVALID_ARGUMENT",
        "mask_padding",
        "between 0 and 1024",
    )


def test_oversized_image_bytes(models_dir: Any) -> None:
    from tests.harness import running

    gen = running(models_dir, max_image_bytes=1000, preload_default=False)
    srv = next(gen)
    try:
        with Client(srv.target) as c:
            noisy = png(Image.effect_noise((64, 64), 64).convert("RGB"))
            assert len(noisy) > 1000
            expect(lambda: c.edit(noisy, "x"), "INVALID_ARGUMENT", "image", "the limit is 1000 bytes")
    finally:
        next(gen, None)


def test_unknown_model_is_not_found(client: Client) -> None:
    err = expect(lambda: client.generate("x", model="no-such-model"), "NOT_FOUND", "")
    assert "no-such-model" in err.message


def test_generate_on_inpainting_model_is_failed_precondition(client: Client) -> None:
    err = expect(lambda: client.generate("x", model=TINY_INPAINT), "FAILED_PRECONDITION", "")
    assert "inpainting model" in err.message


def test_jpeg_input_accepted(client: Client) -> None:
    buf = io.BytesIO()
    sample_image().save(buf, format="JPEG")
    assert client.edit(buf.getvalue(), "x", steps=2, strength=0.5).image.width == 64


def test_invalid_request_leaves_nothing_queued(client: Client, server: ServerThread) -> None:
    assert server.server is not None
    before = len(server.server.admission.outcomes())
    expect(lambda: client.generate("ok", width=13), "INVALID_ARGUMENT", "params.width")
    assert server.server.queue.depth() == 0
    assert len(server.server.admission.outcomes()) == before
