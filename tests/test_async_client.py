"""The asyncio client against a real server: results, streams, cancellation and errors."""

from __future__ import annotations

import asyncio

import pytest

from sdserve import AsyncClient, Progress, Queued, Result, SdserveError, Started
from tests.harness import ServerThread, pixels


def test_async_generate_stream_cancel_and_errors(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.target) as c:
            result = await c.generate("async", steps=2, seed=3)
            kinds = [type(e) async for e in c.stream_generate("async", steps=2, seed=3)]
            assert kinds == [Queued, Started, Progress, Progress, Result]
            again = await c.stream_generate("async", steps=2, seed=3).result()
            assert (pixels(again.image.data) == pixels(result.image.data)).all()

            stream = c.stream_generate("long", steps=150, width=256, height=256)
            with pytest.raises(SdserveError) as info:
                async for event in stream:
                    if isinstance(event, Progress):
                        stream.cancel()
            assert info.value.code == "CANCELLED"

            with pytest.raises(SdserveError) as info:
                await c.generate("bad", width=12)
            assert info.value.code == "INVALID_ARGUMENT"
            assert info.value.violations[0].field == "params.width"

            models, default = await c.list_models()
            assert default in {m.name for m in models}

    asyncio.run(main())
