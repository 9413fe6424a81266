"""A1111 request bodies as the contract's GenerateRequest, EditRequest or InpaintRequest (one per n_iter): A1111's
defaults and meanings turned into the contract's fields; every rule the contract states is left to the servicer."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.status import FieldViolation
from service.a1111 import catalog, images, policy, samplers
from service.a1111.schemas import Img2ImgBody, ProcessingBody, Txt2ImgBody
from service.settings import Settings

# A1111 draws random seeds below 2^32 - 1; so does this edge, so seeds fit what A1111 clients store.
_A1111_SEEDS = 4294967294
_U64 = 1 << 64


class Refused(Exception):
    """The request asks for something sdserve does not do, or breaks a rule only the edge can check."""

    def __init__(self, violations: Sequence[FieldViolation], ignored: Sequence[str] = ()):
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = tuple(violations)
        self.ignored = tuple(ignored)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready to run: `make(k)` builds iteration k's message for `rpc` (built one at a time, so n_iter
    copies of an input image never sit in memory together)."""

    rpc: str
    iterations: int
    make: Callable[[int], Any]
    choice: samplers.Choice
    seed: int
    ignored: tuple[str, ...]


def txt2img(body: Txt2ImgBody) -> Prepared:
    """POST /sdapi/v1/txt2img as Generate requests."""
    choice, review = _reviewed(body)
    seed = _first_seed(body.seed)
    return Prepared(
        "Generate",
        body.n_iter or 1,
        lambda k: pb.GenerateRequest(params=params(body, choice, seed, k)),
        choice,
        seed,
        tuple(review.ignored),
    )


def img2img(body: Img2ImgBody, settings: Settings) -> Prepared:
    """POST /sdapi/v1/img2img as Edit requests, or Inpaint requests when it has a mask. Decodes (and, where the
    size differs from width x height, resizes) the inputs: call it off the event loop."""
    choice, review = _reviewed(body)
    image, mask = _inputs(body, settings, review.ignored)
    seed = _first_seed(body.seed)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if mask is None:

        def edit(k: int) -> pb.EditRequest:
            return pb.EditRequest(params=params(body, choice, seed, k), image=image, strength=strength)

        return Prepared("Edit", body.n_iter or 1, edit, choice, seed, tuple(review.ignored))
    full_res = body.inpaint_full_res is not False
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x

    def inpaint(k: int) -> pb.InpaintRequest:
        return pb.InpaintRequest(
            params=params(body, choice, seed, k),
            image=image,
            mask=mask,
            mask_blur=4 if blur is None else blur,
            invert_mask=bool(body.inpainting_mask_invert),
            strength=strength,
            area=pb.INPAINT_AREA_MASK_ONLY if full_res else pb.INPAINT_AREA_WHOLE_IMAGE,
            mask_padding=body.inpaint_full_res_padding or 0,
            # A1111 always pastes the original back over the unmasked part.
            preserve_unmasked=True,
        )

    return Prepared("Inpaint", body.n_iter or 1, inpaint, choice, seed, tuple(review.ignored))


def _reviewed(body: ProcessingBody) -> tuple[samplers.Choice, policy.Review]:
    """The sampler choice and the field review; raises Refused when anything is refused."""
    named = body.sampler_name or body.sampler_index or "Euler"
    got = samplers.resolve(named, body.scheduler, "sampler_name" if body.sampler_name else "sampler_index")
    choice = got if isinstance(got, samplers.Choice) else None
    review = policy.review(body, choice)
    if isinstance(got, FieldViolation):
        review.refused.insert(0, got)
    if review.refused or choice is None:
        raise Refused(review.refused, review.ignored)
    return choice, review


def _first_seed(seed: int | None) -> int:
    return secrets.randbelow(_A1111_SEEDS) if seed is None or seed == -1 else seed


def params(body: ProcessingBody, choice: samplers.Choice, seed: int, k: int) -> pb.GenerationParams:
    """The GenerationParams of iteration `k`: its seeds follow on from the previous iteration's, as A1111's do."""
    o: Mapping[str, Any] = body.override_settings or {}
    batch = body.batch_size or 1
    p = pb.GenerationParams(
        model=catalog.checkpoint_name(o.get("sd_model_checkpoint") or ""),
        prompt=body.prompt or "",
        negative_prompt=body.negative_prompt or "",
        width=body.width or 512,
        height=body.height or 512,
        steps=body.steps or 50,
        guidance_scale=7.0 if body.cfg_scale is None else body.cfg_scale,
        scheduler=choice.enum,
        seed=(seed + k * batch) % _U64,
        num_images=batch,
        clip_skip=int(o.get("CLIP_stop_at_last_layers") or 1) - 1,
        request_id=_request_id(body.force_task_id, k),
        preview=_preview(o),
    )
    refiner = body.refiner_checkpoint
    if refiner and refiner != "None":
        p.refiner.model = catalog.checkpoint_name(refiner)
        p.refiner.mode = pb.REFINER_MODE_LATENT_HANDOFF
        if body.refiner_switch_at is not None:
            p.refiner.switch_at = body.refiner_switch_at
    return p


def _request_id(task_id: str | None, k: int) -> str:
    """A1111's force_task_id names the job; later iterations get `-k` appended."""
    if not task_id:
        return ""
    return task_id if k == 0 else f"{task_id}-{k}"


def _preview(o: Mapping[str, Any]) -> pb.PreviewOptions:
    """Live previews for /progress, as A1111's live preview options say (default: a cheap preview every step)."""
    every = o.get("show_progress_every_n_steps", 1)
    if o.get("live_previews_enable") is False or every is None or every <= 0:
        return pb.PreviewOptions(mode=pb.PREVIEW_MODE_NONE)
    mode = pb.PREVIEW_MODE_FULL_VAE if o.get("show_progress_type") == "Full" else pb.PREVIEW_MODE_LATENT_RGB
    return pb.PreviewOptions(mode=mode, every_n_steps=int(every))


def _inputs(body: Img2ImgBody, settings: Settings, ignored: list[str]) -> tuple[bytes, bytes | None]:
    """The init image and mask, sized as A1111 would process them; raises Refused naming a broken one."""
    size = (body.width or 512, body.height or 512)
    whole = body.mask is None or body.inpaint_full_res is False
    mode = body.resize_mode or 0
    bad: list[FieldViolation] = []
    image = mask = None
    target: tuple[int, int] | None = None
    try:
        image = images.decode_b64((body.init_images or [""])[0])
        if whole:
            image, target = images.fitted(image, size, mode, settings, "RGB"), size
        else:
            target = images.upright_size(image, settings)
    except images.BadImage as exc:
        bad.append(FieldViolation("init_images.0", str(exc)))
    if body.mask is not None:
        try:
            mask = images.decode_b64(body.mask)
            mask = images.fitted(mask, target, mode, settings, "L") if target is not None else mask
        except images.BadImage as exc:
            bad.append(FieldViolation("mask", str(exc)))
    if bad or image is None:
        raise Refused(bad, ignored)
    return image, mask
