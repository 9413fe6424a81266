"""Image to image: the pipeline arguments of an EDIT call (the size is the init image's)."""

from __future__ import annotations

from typing import Any

import torch

from sdserve_core.pipeline.call import PipelineCall, common_kwargs, one_or_list


def kwargs(call: PipelineCall) -> dict[str, Any]:
    """The common arguments, the init images and the strength (when given)."""
    assert call.images is not None
    out = common_kwargs(call)
    out["image"] = call.images if isinstance(call.images, torch.Tensor) else one_or_list(call.images)
    if call.strength is not None:
        out["strength"] = call.strength
    return out
