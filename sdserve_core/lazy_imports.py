"""Resolves, on one thread at start-up, every name sdserve takes from diffusers' and transformers' lazy modules.

The first access to such a name imports a submodule through the package's `_LazyModule`, which is not safe when two
threads do it at once: the second can find a half-initialised module and fail with "cannot import name
'CLIPTokenizer' from 'transformers'". That was seen on the first Generate of a fresh `python -m service`: the event
loop tokenised the prompt (service/prompt_chunks.py) while the device worker imported the pipeline, and the request
ended INTERNAL. The server calls `resolve` before its device worker starts, so later accesses are attribute reads.
"""

from __future__ import annotations

from collections.abc import Iterable

DIFFUSERS = (
    "AutoencoderKL",
    "UNet2DConditionModel",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
TRANSFORMERS = ("CLIPTokenizer", "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTextConfig")


def resolve(more_diffusers: Iterable[str] = ()) -> None:
    """Imports the names above (and `more_diffusers`, e.g. the scheduler classes) from diffusers and transformers."""
    import diffusers
    import transformers

    for name in (*DIFFUSERS, *more_diffusers):
        getattr(diffusers, name)
    for name in TRANSFORMERS:
        getattr(transformers, name)
