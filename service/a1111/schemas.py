"""The A1111 API's request and response bodies (the shapes of its modules/api/models.py), as pydantic models.

Every field A1111 accepts is declared with A1111's default, so a body validates as it does there (422 in FastAPI's
shape for a wrong type). Undeclared fields are kept (`extra="allow"`) so the edge can say it ignored them rather than
drop them silently."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _unencodable(value: Any, path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    """The path of the first string in `value` that is not valid UTF-8 text (a lone surrogate from a JSON `\\ud800`
    escape), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _unencodable(item, (*path, key))
        if found is not None:
            return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        """Text the contract cannot carry is refused here, naming the field, instead of failing later."""
        found = _unencodable(data, ())
        if found:
            where = ".".join(str(p) for p in found)
            raise ValueError(f"{where}: must be valid UTF-8 text (a lone surrogate escape such as \\ud800 is not)")
        return data


class ProcessingBody(_Body):
    """What txt2img and img2img share (A1111's StableDiffusionProcessing fields plus the API's own)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = Field(-1, description="-1 picks a random seed; the one used is in `info`.")
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = 0
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgBody(ProcessingBody):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    enable_hr: bool | None = False
    denoising_strength: float | None = 0.75
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgBody(ProcessingBody):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI); a `mask` makes it an inpaint."""

    init_images: list[str] | None = Field(None, description="Base64 images (data: URLs accepted); exactly one.")
    resize_mode: int | None = 0
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="Base64 mask: white is repainted, black kept.")
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    denoising_strength: float | None = 0.75


class ImageResponse(BaseModel):
    """The answer of txt2img and img2img: base64 PNGs, the request as read, and A1111's `info` JSON string."""

    images: list[str] | None = Field(None, description="The generated images, base64 PNG.")
    parameters: dict[str, Any]
    info: str


class PNGInfoBody(_Body):
    """POST /sdapi/v1/png-info."""

    image: str = Field(description="A base64 image (data: URL accepted).")


class PNGInfoResponse(BaseModel):
    """The infotext of an image, its other text chunks, and the infotext parsed into fields."""

    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressResponse(BaseModel):
    """GET /sdapi/v1/progress: the caller's own job."""

    progress: float = Field(description="0 to 1.")
    eta_relative: float = Field(description="Estimated seconds left.")
    state: dict[str, Any]
    current_image: str | None = Field(None, description="The latest preview, base64 JPEG.")
    textinfo: str | None = None


class SamplerItem(BaseModel):
    """One sampler of GET /sdapi/v1/samplers."""

    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    """One schedule type of GET /sdapi/v1/schedulers."""

    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    """One model of GET /sdapi/v1/sd-models."""

    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None
