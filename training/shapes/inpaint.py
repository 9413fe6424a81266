"""Stage 3: fine-tune a 9-channel inpainting UNet from the text-to-image UNet (text encoder frozen)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from .configs import train_scheduler
from .data import random_mask, render_dataset
from .loop import EMA, Budget, Progress, UNetStage, autocast, finish_unet, optimise, seed_everything, set_lr
from .loop import smooth as smoothed
from .tensors import encode_moments, mask_latents, masks_to_tensor, sample_latents, to_tensor
from .text import drop_prompts, token_ids
from .tokenizer import MAX_LENGTH
from .unet import N_LATENTS, P_EMPTY_PROMPT, diffusion_loss, load_or_build_cache, load_text_to_image

log = logging.getLogger(__name__)

N_PAIRS = 16_000
LR = 5e-4
WARMUP = 50
EMA_DECAY = 0.998
EXTRA_CHANNELS = 5  # mask (1) + masked-image latents (4), in the pipeline's concatenation order


def widen_conv_in(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of the UNet taking 9 input channels, the new ones zero-initialised."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["in_channels"] = unet.config.in_channels + EXTRA_CHANNELS
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], EXTRA_CHANNELS, *w.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide


@torch.no_grad()
def build_cache(vae: AutoencoderKL, t2i_cache: dict[str, torch.Tensor], seed: int, n: int) -> dict[str, torch.Tensor]:
    """Masks for the first n text-to-image training scenes and the posteriors of their masked images.

    The targets' posteriors and token ids are reused from the text-to-image cache (same seed).
    """
    images, scenes = render_dataset(seed, n)
    masks = masks_to_tensor([random_mask(s, random.Random(f"mask:{seed}:{i}")) for i, s in enumerate(scenes)])
    # The pipeline zeroes the masked pixels of the [-1, 1] image before encoding.
    masked_mean, masked_std = encode_moments(vae, to_tensor(images) * (1 - masks))
    return {
        "target_mean": t2i_cache["mean"][:n].clone(),
        "target_std": t2i_cache["std"][:n].clone(),
        "masked_mean": masked_mean,
        "masked_std": masked_std,
        "mask": mask_latents(masks),
        "ids": t2i_cache["ids"][:n].clone(),
    }


def train_inpaint(stage: UNetStage, t2i_dir: Path, out: Path) -> dict[str, float | str]:
    """Fine-tune for the stage's budget; save the EMA UNet to out/unet."""
    seed = stage.seed
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(str(stage.vae_dir)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(stage.tokenizer_dir))
    base, text_encoder = load_text_to_image(t2i_dir)
    text_encoder.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out.parent / "inpaint-latents.pt"
    cache: dict[str, torch.Tensor] = torch.load(cache_path) if cache_path.exists() else {}
    if "ids" not in cache or cache["ids"].shape != (N_PAIRS, MAX_LENGTH):
        t2i_cache = load_or_build_cache(out.parent / "t2i-latents.pt", vae, tokenizer, seed + 1, N_LATENTS)
        cache = build_cache(vae, t2i_cache, seed + 1, N_PAIRS)
        torch.save(cache, cache_path)
    scale = float(vae.config.scaling_factor)
    empty = token_ids(tokenizer, [""])[0]
    unet = widen_conv_in(base)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    ema = EMA(params, EMA_DECAY)
    scheduler = train_scheduler()
    gen = torch.Generator().manual_seed(seed)
    budget = Budget(stage.seconds, WARMUP, stage.steps)
    progress = Progress("inpaint")
    smooth, step = 0.0, 0
    while not budget.done(step):
        idx = torch.randint(N_PAIRS, (stage.batch,), generator=gen)
        latents = cache["target_mean"][idx] * scale  # posterior means as targets (see unet.py)
        masked = sample_latents(cache["masked_mean"][idx], cache["masked_std"][idx], scale)
        ids = drop_prompts(cache["ids"][idx], empty, P_EMPTY_PROMPT, gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (stage.batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            emb = text_encoder(ids)[0]
        set_lr(opt, LR, budget.factor(step))
        with autocast(stage.precision):
            pred = unet(torch.cat([noisy, cache["mask"][idx], masked], dim=1), t, emb).sample
        loss = diffusion_loss(scheduler, pred.float(), latents, noise, t)
        optimise(loss, opt, params, ema)
        smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth, lr=LR * budget.factor(step))
        step += 1
    figures = finish_unet(ema, budget, progress, step, smooth, stage.precision, stage.batch)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    return figures
