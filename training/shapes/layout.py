"""Stage 4: fine-tune the text-to-image UNet so that the first sampling steps take the layout from the prompt.

With SD's scaled-linear betas a training input at t >= 900 still holds 7-11% of the image: enough for
the UNet to read the shape's position from that residue instead of from the prompt. Sampling starts
from pure noise, so positions came out random (18% right after stage 2). Here those timesteps are
trained on the pure noise that sampling actually gives them, with the target whose predicted image is
the training image, weighted up (a small epsilon error is a large image error there), so the only
source of the layout left is the text. The text encoder stays frozen: the inpainting UNet shares it.

Status: experimental and off by default. In the shipped run 508 steps (20 min on a loaded 2-core
machine) left positions still following the noise (16% right) and lowered colour accuracy, so the
stage-2 UNet was shipped; with a zero budget the stage just passes the stage-2 weights through.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from .configs import train_scheduler
from .loop import EMA, Budget, Progress, optimise, seed_everything, set_lr
from .loop import smooth as smoothed
from .tensors import sample_latents
from .text import drop_prompts, token_ids
from .unet import N_LATENTS, P_EMPTY_PROMPT, load_or_build_cache, load_text_to_image, min_snr_weights

log = logging.getLogger(__name__)

BATCH = 64
LR = 3e-4
WARMUP = 50
EMA_DECAY = 0.995
T_BLIND = 900
P_BLIND = 0.25
BLIND_WEIGHT = 10.0


def train_layout(
    vae_dir: Path, tokenizer_dir: Path, t2i_dir: Path, out: Path, seconds: float, seed: int, steps: int | None = None
) -> dict[str, float]:
    """Fine-tune the stage-2 UNet for the budget; save its EMA weights to out/unet."""
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    cache = load_or_build_cache(t2i_dir.parent / "t2i-latents.pt", vae, tokenizer, seed + 1, N_LATENTS)
    scale = float(vae.config.scaling_factor)
    empty = token_ids(tokenizer, [""])[0]
    unet, text_encoder = load_text_to_image(t2i_dir)
    text_encoder.eval().requires_grad_(False)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    ema = EMA(params, EMA_DECAY)
    scheduler = train_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(seed + 5)
    budget = Budget(seconds, WARMUP, steps)
    progress = Progress("layout")
    smooth, step = 0.0, 0
    while not budget.done(step):
        idx = torch.randint(N_LATENTS, (BATCH,), generator=gen)
        latents = sample_latents(cache["mean"][idx], cache["std"][idx], scale)
        ids = drop_prompts(cache["ids"][idx], empty, P_EMPTY_PROMPT, gen)
        noise = torch.randn(latents.shape, generator=gen)
        blind = torch.rand(BATCH, generator=gen) < P_BLIND
        t = torch.where(
            blind,
            torch.randint(T_BLIND, scheduler.config.num_train_timesteps, (BATCH,), generator=gen),
            torch.randint(0, T_BLIND, (BATCH,), generator=gen),
        )
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = torch.where(blind.view(-1, 1, 1, 1), noise, scheduler.add_noise(latents, noise, t))
        # For a pure-noise input, the epsilon whose implied image is the training image.
        target = torch.where(blind.view(-1, 1, 1, 1), (noise - a.sqrt() * latents) / (1 - a).sqrt(), noise)
        weights = torch.where(blind, torch.full((BATCH,), BLIND_WEIGHT), min_snr_weights(alphas_cumprod, t))
        with torch.no_grad():
            emb = text_encoder(ids)[0]
        set_lr(opt, LR, budget.factor(step))
        pred = unet(noisy, t, emb).sample
        loss = (weights * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        optimise(loss, opt, params, ema)
        smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth, lr=LR * budget.factor(step))
        step += 1
    ema.copy_to_params()
    figures = {"steps": step, "seconds": budget.elapsed(), "final_loss": smooth}
    progress.step(step, force=True, **figures)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    return figures
