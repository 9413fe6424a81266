"""Text to image: the pipeline arguments of a GENERATE call."""

from __future__ import annotations

from typing import Any

from sdserve_core.pipeline.call import PipelineCall, common_kwargs


def kwargs(call: PipelineCall) -> dict[str, Any]:
    """The prompt (or embeddings), steps, guidance, generators, output type and the image size."""
    out = common_kwargs(call)
    out.update(height=call.height, width=call.width)
    return out
