"""The model-folder contract: a diffusers folder's required layout, its sdserve.json metadata, and its native size.

Both processes go through this module: the server reads a folder with check_layout and read_meta (ModelEntry.read),
the model manager carries the metadata forward with read_meta_dict and rewrites it with write_meta. sdserve.json is
optional; every field has a default (FolderMeta), and keys this module does not know are kept by writers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

META_FILE = "sdserve.json"
META_FORMAT = 1
MODEL_INDEX = "model_index.json"
# The subfolders every served folder has, in the order their absence is reported. An SDXL refiner's
# model_index.json names no first text encoder or tokenizer ([null, null]); those are then not required.
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# The subfolders required only when model_index.json names them (SDXL's second text encoder and tokenizer).
OPTIONAL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")

# (factors: one RGB row per latent channel, bias: RGB): the linear latent-to-RGB projection used for previews.
LatentRGB = tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]


@dataclasses.dataclass(frozen=True)
class FolderMeta:
    """What a folder's sdserve.json says, with the defaults of a folder that has none (see read_meta).

    `revision` is empty when sdserve.json names none (the server then uses the folder's content revision);
    `latent_rgb` is None when it sets no projection (the server then uses its SD 1.x one). `default_width` and
    `default_height` default to the folder's native size, which read_meta fills in.
    """

    revision: str = ""
    variant: str = "fp32"
    description: str = ""
    default_width: int = 512
    default_height: int = 512
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    inpaint_model: str = ""
    latent_rgb: LatentRGB | None = None
    # A VAE subfolder that is safe in float16 (for SDXL, a "fixed" fp16 VAE): loaded instead of vae/ when the
    # model computes in float16. Empty: vae/ (decoded in float32 when its config says force_upcast).
    vae_fp16: str = ""


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file is missing; malformed JSON raises ValueError."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}


def read_meta_dict(folder: Path) -> dict[str, Any]:
    """The raw sdserve.json of `folder`, unknown keys included: {} when missing, unreadable or not an object.

    Lenient on purpose: this is what a writer carries forward into the sdserve.json it writes (write_meta).
    """
    try:
        data = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def named_components(index: dict[str, Any]) -> set[str]:
    """The subfolders a model_index.json names with a library and class (not [null, null])."""
    return {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None}


def required_subfolders(folder: Path) -> tuple[str, ...]:
    """The subfolders `folder` must have: REQUIRED_SUBFOLDERS less those its model_index.json sets to [null, null],
    then the OPTIONAL_SUBFOLDERS it names."""
    index = read_json(folder / MODEL_INDEX)
    named = named_components(index)
    nulled = {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
    return tuple(s for s in REQUIRED_SUBFOLDERS if s not in nulled) + tuple(
        s for s in OPTIONAL_SUBFOLDERS if s in named
    )


def check_layout(folder: Path) -> None:
    """Raises ValueError naming the first of model_index.json and the required subfolders that `folder` lacks."""
    if not (folder / MODEL_INDEX).is_file():
        raise ValueError(f"{folder} has no {MODEL_INDEX}")
    for sub in required_subfolders(folder):
        if not (folder / sub).is_dir():
            raise ValueError(f"{folder} has no {sub}/ folder")


def native_size(folder: Path) -> tuple[int, int]:
    """(width, height) in pixels the model was made for: the UNet's sample size times the VAE's scale factor.

    The scale factor is 2 ** (number of VAE blocks - 1); missing configs count as SD 1.x (64 latents, 4 blocks: 512).
    """
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    sample = unet.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, list) else int(sample)
    size = int(sample * scale)
    return size, size


def _latent_rgb(rgb: Any) -> LatentRGB | None:
    """The projection of sdserve.json's `latent_rgb` ({"factors": rows, "bias": RGB}), None when it sets none."""
    if not rgb:
        return None
    factors = tuple(tuple(float(v) for v in row) for row in rgb["factors"])
    bias = tuple(float(v) for v in rgb.get("bias", (0.0, 0.0, 0.0)))
    return cast(LatentRGB, (factors, bias))


def read_meta(folder: Path) -> FolderMeta:
    """The typed sdserve.json of `folder` (every field defaulted when absent); malformed JSON raises ValueError."""
    meta = read_json(folder / META_FILE)
    width, height = native_size(folder)
    return FolderMeta(
        revision=str(meta.get("revision") or ""),
        variant=str(meta.get("variant", "fp32")),
        description=str(meta.get("description", "")),
        default_width=int(meta.get("default_width", width)),
        default_height=int(meta.get("default_height", height)),
        default_steps=int(meta.get("default_steps", 20)),
        default_guidance_scale=float(meta.get("default_guidance_scale", 7.5)),
        inpaint_model=str(meta.get("inpaint_model", "")),
        latent_rgb=_latent_rgb(meta.get("latent_rgb")),
        vae_fp16=_subfolder(meta.get("vae_fp16", "")),
    )


def _subfolder(value: Any) -> str:
    """sdserve.json's `vae_fp16`: empty, or the name of one subfolder of the model folder (ValueError otherwise)."""
    name = str(value or "")
    if name and (name in (".", "..") or "/" in name or "\\" in name):
        raise ValueError(f"sdserve.json vae_fp16 must name a subfolder of the model folder, not {name!r}")
    return name


def write_meta(folder: Path, base: dict[str, Any], **fields: Any) -> None:
    """Writes `folder`/sdserve.json: `base` (defaults carried from the source) updated with `fields`.

    `format` is META_FORMAT unless `base` or `fields` set it; keys are sorted, two-space indented, newline-ended.
    """
    data = dict(base)
    data.update(fields)
    data.setdefault("format", META_FORMAT)
    (folder / META_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
