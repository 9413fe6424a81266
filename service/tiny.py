"""Builds the tiny deterministic stand-in model used when no trained model is present."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdserve_core import model_folder
from sdserve_core.components import CONSTRUCTION_LOCK

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

TINY_NAME = "tiny-sd"


def write_tokenizer(folder: Path) -> None:
    """Writes a byte-level CLIP tokenizer (no merges) that loads offline."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    # GPT-2 byte-to-unicode table, as CLIP uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tok.save_pretrained(str(folder))


def write_model_index(folder: Path, pipeline_class: str, scheduler_class: str) -> None:
    """Writes an SD 1.x model_index.json (no safety checker or feature extractor, as the server loads it)."""
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny(folder: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """Writes a tiny SD 1.x-layout model (random weights from `seed`) to `folder`, atomically.

    `in_channels` 9 makes an inpainting UNet (latents + mask + masked-image latents).
    """
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    with CONSTRUCTION_LOCK:  # built from configs: not while another thread's load patches module construction
        _write_tiny(tmp, seed, in_channels)
    try:
        tmp.rename(folder)
    except OSError:
        # Another process published it first; theirs is identical.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_tiny(tmp: Path, seed: int, in_channels: int) -> None:
    """Builds the components from `seed` and saves them, with model_index.json and sdserve.json, to `tmp`."""
    unet = _tiny_unet(seed, in_channels)
    vae = tiny_vae(seed + 1)
    text_encoder = _tiny_text_encoder(seed + 2)
    scheduler = _tiny_scheduler()
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    write_tokenizer(tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    write_model_index(
        tmp, "StableDiffusionInpaintPipeline" if in_channels == 9 else "StableDiffusionPipeline", "DDIMScheduler"
    )
    meta = {
        "format": 1,
        "description": "Tiny random-weight SD 1.x-layout model built locally; produces noise-like images.",
        "default_steps": 20,
        "default_guidance_scale": 7.5,
    }
    # Written byte for byte as the tiny model always was: its revision is a hash of its files, and results and
    # image metadata carry that revision (model_folder.write_meta sorts keys, which would change it).
    (tmp / model_folder.META_FILE).write_text(json.dumps(meta, indent=2))


def _tiny_unet(seed: int, in_channels: int) -> UNet2DConditionModel:
    """A two-level UNet with cross-attention, random weights from `seed`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_vae(seed: int, **config: Any) -> AutoencoderKL:
    """A three-level VAE with 4 latent channels, random weights from `seed`; `config` adds to its configuration."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def _tiny_text_encoder(seed: int) -> CLIPTextModel:
    """A three-layer CLIP text encoder over the byte-level vocabulary of write_tokenizer, random weights from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=514,
            max_position_embeddings=77,
        )
    )


def _tiny_scheduler() -> DDIMScheduler:
    """The SD 1.x DDIM scheduler configuration."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
