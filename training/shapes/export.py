"""Stage 6: assemble the two diffusers folders (fp16 UNets, shared VAE / text encoder / tokenizer)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTokenizer

from .configs import inference_scheduler
from .projection import fit_latent_rgb
from .tokenizer import copy_vocab_files
from .unet import load_text_to_image

log = logging.getLogger(__name__)

T2I_NAME = "shapes"
INPAINT_NAME = "shapes-inpainting"
DESCRIPTIONS = {
    T2I_NAME: "Tiny SD-architecture text-to-image model for 64x64 coloured shapes (sdserve's embedded default).",
    INPAINT_NAME: "Tiny SD-architecture inpainting model for 64x64 coloured shapes (sdserve's embedded default).",
}


# Default guidance of the shipped folders. Text-to-image, measured on the shipped family (batch 32; 96 grid
# prompts, DDIM 20, two grids: seeds 0 and 1): guidance 1.5 / 2 / 2.5 / 3 / 4 / 5 gave shape class 75.0-83.3 /
# 82.3-83.3 / 80.2 / 76.0-78.1 / 72.9-74.0 / 71.9-74.0% and all attributes right 72.9-81.2 / 80.2-82.3 /
# 78.1 / 75.0-76.0 / 71.9 / 65.6-67.7%: above 2 guidance overshoots (the sides of squares turn concave,
# shapes outgrow their size word), below it the prompt holds less (the batch-64 family peaked at 3).
# Inpainting, measured on the batch-64 family (96 recolour cases): guidance 1 / 2 / 3 / 5 / 7.5 gave PSNR outside
# the mask 41.2 / 35.6 / 32.1 / 28.4 / 25.8 dB and recolour 97.9 / 100 / 100 / 100 / 100%: guidance pushes the
# unmasked area away from the input too.
DEFAULT_GUIDANCE = {T2I_NAME: 2.0, INPAINT_NAME: 3.0}


def sdserve_json(name: str, latent_rgb: dict[str, Any]) -> dict[str, Any]:
    """The server-side metadata file's content."""
    meta: dict[str, Any] = {
        "format": 1,
        "description": DESCRIPTIONS[name],
        "latent_rgb": {"factors": latent_rgb["factors"], "bias": latent_rgb["bias"]},
        "default_steps": 20,
        "default_guidance_scale": DEFAULT_GUIDANCE[name],
        "default_width": 64,
        "default_height": 64,
    }
    if name == T2I_NAME:
        meta["inpaint_model"] = INPAINT_NAME
    return meta


def _stage_dir(preferred: Path, fallback: Path, weights: str) -> Path:
    return preferred if (preferred / weights).exists() else fallback


_UNET = "unet/diffusion_pytorch_model.safetensors"


def terminal_dir(work: Path) -> Path:
    """The text-to-image UNet the inpainting and reflow stages start from: stage 2b's if it ran, else stage 2's."""
    return _stage_dir(work / "t2i-terminal", work / "t2i", _UNET)


def t2i_dir(work: Path) -> Path:
    """The text-to-image stage output to ship: the reflow fine-tune if that stage ran, else terminal_dir."""
    return _stage_dir(work / "t2i-reflow", terminal_dir(work), _UNET)


def vae_dir(work: Path) -> Path:
    """The VAE to ship: decoder-tuned if that stage ran."""
    return _stage_dir(work / "vae-tuned", work / "vae", "diffusion_pytorch_model.safetensors")


def weight_bytes(folder: Path) -> int:
    """Total size of the .safetensors files under folder."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def _publish(pipe: DiffusionPipeline, tokenizer_dir: Path, dest: Path, meta: dict[str, Any]) -> None:
    # A hidden sibling, renamed in when complete, so model scanners never see a partial folder.
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    copy_vocab_files(tokenizer_dir, tmp / "tokenizer")
    _drop_source_paths(tmp)
    (tmp / "sdserve.json").write_text(json.dumps(meta, indent=2) + "\n")
    if (dest / "README.md").exists():
        shutil.copy2(dest / "README.md", tmp / "README.md")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _drop_source_paths(folder: Path) -> None:
    """Remove `_name_or_path` (the work directory a component was loaded from) from the saved configs."""
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def export(work: Path, out_root: Path, seed: int) -> dict[str, Any]:
    """Write out_root/shapes and out_root/shapes-inpainting; return projection and size figures."""
    tokenizer_dir = work / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vae = AutoencoderKL.from_pretrained(str(vae_dir(work))).eval()
    unet, text_encoder = load_text_to_image(t2i_dir(work))
    inpaint_unet = UNet2DConditionModel.from_pretrained(str(work / "inpaint" / "unet"))
    latent_rgb = fit_latent_rgb(vae, seed + 3)
    log.info("stage=export from %s, %s: latent_rgb rmse=%.4f", t2i_dir(work), vae_dir(work), latent_rgb["rmse"])
    out_root.mkdir(parents=True, exist_ok=True)
    for name, cls, u in (
        (T2I_NAME, StableDiffusionPipeline, unet),
        (INPAINT_NAME, StableDiffusionInpaintPipeline, inpaint_unet),
    ):
        # fp16 UNets keep both folders under 30 MB; loaders upcast them to the requested dtype.
        pipe = cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=copy.deepcopy(u).to(torch.float16),
            scheduler=inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        _publish(pipe, tokenizer_dir, out_root / name, sdserve_json(name, latent_rgb))
    sizes = {name: weight_bytes(out_root / name) for name in (T2I_NAME, INPAINT_NAME)}
    log.info("stage=export weight_bytes=%s total=%d", sizes, sum(sizes.values()))
    return {"latent_rgb_rmse": latent_rgb["rmse"], "weight_bytes": sizes, "total_weight_bytes": sum(sizes.values())}
