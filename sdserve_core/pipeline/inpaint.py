"""Inpainting: the pipeline arguments of an INPAINT call, whole image or a crop around the mask."""

from __future__ import annotations

from typing import Any

import torch

from sdserve_core.pipeline.call import PipelineCall, common_kwargs, first, one_or_list


def kwargs(call: PipelineCall) -> dict[str, Any]:
    """The common arguments, init images, masks, size and strength (when given); with `mask_padding` the
    pipeline repaints a crop around the mask (see mask_only)."""
    assert call.images is not None and call.masks is not None
    assert not isinstance(call.images, torch.Tensor), "inpaint takes images"
    out = common_kwargs(call)
    out.update(image=one_or_list(call.images), mask_image=one_or_list(call.masks), height=call.height, width=call.width)
    if call.strength is not None:
        out["strength"] = call.strength
    if call.mask_padding is not None:
        mask_only(out, call)
    return out


def mask_only(out: dict[str, Any], call: PipelineCall) -> None:
    """diffusers crops around the mask (padding_mask_crop) only for a single PIL image and mask: the call's
    images share one init image, mask and prompt, so it passes the first of each and asks for `count` images."""
    assert call.images is not None and call.masks is not None
    assert not isinstance(call.images, torch.Tensor), "inpaint takes images"
    out["padding_mask_crop"] = call.mask_padding
    out.update(image=first(call.images), mask_image=first(call.masks), num_images_per_prompt=call.count)
    if call.embeds is not None:
        out["prompt_embeds"] = call.embeds.positive[:1]
        out["negative_prompt_embeds"] = None if call.embeds.negative is None else call.embeds.negative[:1]
