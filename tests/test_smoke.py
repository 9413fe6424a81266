"""The server starts on port 0, reports itself and runs each task end to end."""

from __future__ import annotations

from sdserve import Client, Progress, Queued, Result, Started
from tests.harness import TINY, png, sample_image, sample_mask


def test_server_info_lists_schedulers_and_limits(client: Client) -> None:
    info = client.server_info()
    assert info.device == "cpu"
    assert info.dtype == "float32"
    assert len(info.schedulers) == 11
    assert info.limits.max_message_bytes == 64 * 1024 * 1024
    assert info.default_model == TINY


def test_generate_stream_event_order(client: Client) -> None:
    events = list(client.stream_generate("a red circle", steps=3, seed=5))
    kinds = [type(e) for e in events]
    assert kinds == [Queued, Started, Progress, Progress, Progress, Result]
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3]
    result = events[-1]
    assert isinstance(result, Result)
    assert result.image.data.startswith(b"\x89PNG")
    assert (result.image.width, result.image.height) == (64, 64)
    assert result.parameters["model"] == TINY


def test_edit_and_inpaint_run(client: Client) -> None:
    image = png(sample_image())
    r = client.edit(image, "blue", strength=0.5, steps=4, seed=1)
    assert r.parameters["strength"] == 0.5
    r = client.inpaint(image, png(sample_mask()), "green", steps=2, seed=1)
    assert r.image.width == 64


def test_scheduler_names_agree_across_contract_server_and_client() -> None:
    from sdserve.types import SCHEDULER_NAMES
    from sdserve.v1 import diffusion_pb2 as pb
    from service.schedulers import SCHEDULERS

    contract = {v.name.removeprefix("SCHEDULER_") for v in pb.Scheduler.DESCRIPTOR.values} - {"UNSPECIFIED"}
    assert set(SCHEDULER_NAMES) == contract == set(SCHEDULERS)
