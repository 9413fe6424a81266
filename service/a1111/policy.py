"""Which A1111 fields sdserve honours, ignores (naming them in the x-sdserve-ignored header) or refuses (422 naming
the field): nothing a request asks for is dropped silently when dropping it would change the image."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdserve_core.status import FieldViolation
from service.a1111.catalog import FIXED_OPTIONS
from service.a1111.images import MAX_UINT32
from service.a1111.samplers import Choice
from service.a1111.schemas import Img2ImgBody, ProcessingBody

IGNORED_HEADER = "x-sdserve-ignored"
MAX_ITERATIONS = 100
_HEADER_CHARS = 2000

Check = Callable[[Any], bool]
_ABSENT = object()


def _on(value: Any) -> bool:
    return bool(value)


def _nonzero(value: Any) -> bool:
    return value is not None and value != 0


def _positive(value: Any) -> bool:
    return value is not None and value > 0


def _not_one(value: Any) -> bool:
    return value is not None and value != 1


def _whole(value: Any) -> bool:
    """An integer, or a float with no fraction (JSON clients send 2.0 for 2)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


# field -> (is it asked for?, why it cannot be honoured)
REFUSED: dict[str, tuple[Check, str]] = {
    "restore_faces": (_on, "face restoration is not supported"),
    "tiling": (_on, "seamless tiling is not supported"),
    "subseed_strength": (_nonzero, "variation seeds are not supported; vary `seed` instead"),
    "seed_resize_from_h": (_positive, "seed resize is not supported"),
    "seed_resize_from_w": (_positive, "seed resize is not supported"),
    "s_churn": (_nonzero, "sampler churn is not supported"),
    "s_min_uncond": (_nonzero, "skipping the negative prompt at low sigma (NGMS) is not supported"),
    "script_name": (_on, "scripts are not supported"),
    "firstpass_image": (_on, "a given first-pass image (hires fix) is not supported"),
    "infotext": (_on, "reading the request from an infotext is not supported; send the fields themselves"),
    # txt2img only
    "enable_hr": (_on, "hires fix (a second, upscaled pass) is not supported; ask for the final size"),
    "firstphase_width": (_nonzero, "hires fix first-pass sizes are not supported"),
    "firstphase_height": (_nonzero, "hires fix first-pass sizes are not supported"),
    # img2img only
    "latent_mask": (_on, "a separate latent mask is not supported"),
    "initial_noise_multiplier": (_not_one, "noise multipliers are not supported; send 1 or leave it out"),
}
# field -> is it asked for? (harmless to skip: named in the response header)
IGNORED: dict[str, Check] = {
    "styles": _on,
    "save_images": _on,
    "comments": _on,
    "script_args": _on,
    "override_settings_restore_afterwards": lambda v: v is False,
    "image_cfg_scale": lambda v: v is not None,
    "mask_round": lambda v: v is False,
}
# override_settings keys turned into request fields; any other key is ignored unless it equals FIXED_OPTIONS.
HONOURED_OVERRIDES = {
    "sd_model_checkpoint",
    "CLIP_stop_at_last_layers",
    "show_progress_every_n_steps",
    "live_previews_enable",
    "show_progress_type",
}
REFUSED_OVERRIDES: dict[str, tuple[Check, str]] = {
    "sd_vae": (lambda v: v not in (None, "", "Automatic", "None"), "VAE overrides are not supported"),
    "eta_noise_seed_delta": (_nonzero, "ENSD seed offsets are not supported"),
}


def ignored_header(ignored: Sequence[str]) -> dict[str, str]:
    """The x-sdserve-ignored header naming `ignored` (comma-separated; names percent-encoded to ASCII; a list too
    long for a header ends with `...`), or none."""
    if not ignored:
        return {}
    value = ",".join(urllib.parse.quote(name, safe="._-[]") for name in ignored)
    if len(value) > _HEADER_CHARS:
        value = value[: _HEADER_CHARS - 3].rsplit(",", 1)[0] + ",..."
    return {IGNORED_HEADER: value}


@dataclasses.dataclass
class Review:
    """What a request asks for that is ignored (field names) or refused (violations)."""

    ignored: list[str] = dataclasses.field(default_factory=list)
    refused: list[FieldViolation] = dataclasses.field(default_factory=list)

    def refuse(self, field: str, rule: str) -> None:
        self.refused.append(FieldViolation(field, rule))


def review(body: ProcessingBody, choice: Choice | None) -> Review:
    """Every field of `body` that sdserve ignores or refuses, and the edge's own range checks (those the contract
    cannot state: A1111's -1 and 0 meanings, values that do not fit its integer fields)."""
    r = Review()
    fields = type(body).model_fields
    for name, (asked, why) in REFUSED.items():
        if name in fields and asked(getattr(body, name)):
            r.refuse(name, why)
    r.ignored += [name for name, asked in IGNORED.items() if name in fields and asked(getattr(body, name))]
    r.ignored += sorted(body.model_extra or {})
    _overrides(body.override_settings or {}, r)
    _scripts(body.alwayson_scripts or {}, r)
    _counts(body, r)
    if choice is not None:
        _sampler_params(body, choice, r)
    if body.disable_extra_networks and "<lora:" in f"{body.prompt} {body.negative_prompt}":
        r.refuse("disable_extra_networks", "cannot be true when the prompt names LoRAs with <lora:...>")
    if isinstance(body, Img2ImgBody):
        _img2img(body, r)
    return r


def _overrides(overrides: Mapping[str, Any], r: Review) -> None:
    for key, value in overrides.items():
        field = f"override_settings.{key}"
        if key in REFUSED_OVERRIDES:
            asked, why = REFUSED_OVERRIDES[key]
            if asked(value):
                r.refuse(field, why)
        elif key not in HONOURED_OVERRIDES and FIXED_OPTIONS.get(key, _ABSENT) != value:
            r.ignored.append(field)
    clip = overrides.get("CLIP_stop_at_last_layers")
    if clip is not None and (not _whole(clip) or not 1 <= clip <= 49):
        r.refuse("override_settings.CLIP_stop_at_last_layers", f"must be an integer from 1 (no skip) up; got {clip!r}")
    every = overrides.get("show_progress_every_n_steps")
    if every is not None and (not _whole(every) or every > 1000):
        r.refuse("override_settings.show_progress_every_n_steps", f"must be an integer up to 1000; got {every!r}")
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        r.refuse("override_settings.sd_model_checkpoint", "must be a model name, alias or title")


def _scripts(scripts: Mapping[str, Any], r: Review) -> None:
    """Always-on scripts (extensions) do not run here: one given arguments that enable it is refused; one sent
    empty or disabled (`{"args": []}`, `{"args": [false]}`, as clients send to keep an extension off) is ignored."""
    for name, value in scripts.items():
        args = value.get("args") if isinstance(value, dict) else value
        if args in (None, [], [False], {}):
            r.ignored.append(f"alwayson_scripts.{name}")
        else:
            r.refuse(f"alwayson_scripts.{name}", "always-on scripts (extensions such as ControlNet) are not supported")


def _counts(body: ProcessingBody, r: Review) -> None:
    """Integers the contract keeps unsigned: A1111 gives 0 and negatives no meaning there, so say so here."""
    for name in ("width", "height", "steps", "batch_size"):
        value = getattr(body, name)
        if value is not None and not 1 <= value <= MAX_UINT32:
            r.refuse(name, f"must be at least 1; got {value}")
    if body.n_iter is not None and not 1 <= body.n_iter <= MAX_ITERATIONS:
        r.refuse("n_iter", f"must be between 1 and {MAX_ITERATIONS}; got {body.n_iter}")
    if body.seed is not None and not -1 <= body.seed < 1 << 64:
        r.refuse("seed", f"must be -1 (random) or 0 to 2^64-1; got {body.seed}")


def _sampler_params(body: ProcessingBody, choice: Choice, r: Review) -> None:
    """eta and s_noise change the image only for some samplers; refuse them where sdserve would run otherwise."""
    runs = choice.sampler.eta
    if body.eta is not None and runs is not None and body.eta != runs:
        r.refuse("eta", f"sampler {choice.sampler.name!r} runs at eta {runs:g} here; send {runs:g} or leave it out")
    if choice.sampler.ancestral and _not_one(body.s_noise):
        r.refuse("s_noise", f"sampler {choice.sampler.name!r} runs at s_noise 1 here; send 1 or leave it out")


def _img2img(body: Img2ImgBody, r: Review) -> None:
    images = body.init_images or []
    if len(images) != 1:
        r.refuse("init_images", f"must hold exactly one image; got {len(images)} (use batch_size for several results)")
    if body.resize_mode not in (None, 0, 1, 2):
        modes = "0 (just resize), 1 (crop and resize) or 2 (resize and fill)"
        r.refuse("resize_mode", f"must be {modes}; got {body.resize_mode}")
    if body.mask is None:
        return
    if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
        r.refuse("mask_blur_x", "must equal mask_blur_y: only a round blur is supported (or send mask_blur)")
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
    if blur is not None and not 0 <= blur <= MAX_UINT32:
        r.refuse("mask_blur", f"must be at least 0; got {blur}")
    padding = body.inpaint_full_res_padding
    if padding is not None and not 0 <= padding <= MAX_UINT32:
        r.refuse("inpaint_full_res_padding", f"must be at least 0; got {padding}")
    if body.inpainting_mask_invert not in (None, 0, 1):
        r.refuse("inpainting_mask_invert", f"must be 0 or 1; got {body.inpainting_mask_invert}")
    fill = body.inpainting_fill
    if fill == 0:
        # A1111's API default ("fill"); sdserve starts from the original pixels, as "original" (1) does.
        r.ignored.append("inpainting_fill")
    elif fill in (2, 3) and (body.denoising_strength or 0) < 1:
        r.refuse("inpainting_fill", "latent noise / latent nothing need denoising_strength 1 here; or use 1 (original)")
    elif fill not in (None, 1, 2, 3):
        r.refuse("inpainting_fill", f"must be 0, 1, 2 or 3; got {fill}")
