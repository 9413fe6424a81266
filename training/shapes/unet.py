"""Stage 2: train the text-to-image UNet and the text encoder together on cached latents; stage 2b
("terminal"): fine-tune both on the shipped zero-terminal-SNR schedule."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .configs import new_text_encoder, new_unet, sd_scheduler, train_scheduler
from .data import render_dataset
from .grammar import prompt_text
from .loop import EMA, Budget, Progress, finish_unet, optimise, seed_everything, set_lr
from .loop import smooth as smoothed
from .tensors import encode_moments, to_tensor
from .text import drop_prompts, token_ids

log = logging.getLogger(__name__)

N_LATENTS = 20_000
BATCH = 64
LR = 1e-3
WARMUP = 150
EMA_DECAY = 0.998
P_EMPTY_PROMPT = 0.1
MIN_SNR = 5.0
# Stage 2b: a gentler learning rate, and for its first half part of each batch drawn from the noisiest
# steps, where the zero-SNR schedule leaves nothing but the prompt to take the layout from; uniform steps
# after that. A recipe sweep on one GPU (step counts equal to this CPU's budgets, 96 grid prompts, DDIM 20,
# guidance 7.5) gave, from the same stage-2 weights: 823 steps with the noisy share throughout: shape 61%,
# position 87%, all right 50%; 1,650 steps, noisy share in the first half: shape 62%, size 85%, position 93%,
# all right 52%; 1,650 uniform steps: shape 68%, position 78%, all right 50%.
TERMINAL_LR = 3e-4
TERMINAL_WARMUP = 50
P_HIGH_T = 0.4
HIGH_T = 850
HIGH_T_UNTIL = 0.5
# The UNets learn to make posterior means, not posterior samples. This VAE's posterior noise is as large as
# the difference between a circle and a square of the same place and size (squared latent distance 231 vs
# summed posterior variance 201 of the two, over 48 grid scenes), so with sampled targets the shape class
# was a small part of what the loss could learn. The decoder decodes means as well as samples (same
# scores on exact renders); the inpainting pipeline still encodes its masked image with `sample()`, and
# the inpainting stage conditions on samples the same way.


def build_cache(vae: AutoencoderKL, tokenizer: CLIPTokenizer, seed: int, n: int) -> dict[str, torch.Tensor]:
    """Render n scenes and keep their posterior moments and prompt token ids."""
    images, scenes = render_dataset(seed, n)
    mean, std = encode_moments(vae, to_tensor(images))
    return {"mean": mean, "std": std, "ids": token_ids(tokenizer, [prompt_text(s.attrs) for s in scenes])}


def load_or_build_cache(
    path: Path, vae: AutoencoderKL, tokenizer: CLIPTokenizer, seed: int, n: int
) -> dict[str, torch.Tensor]:
    """The latent cache for this VAE, built once and kept on disk."""
    if path.exists():
        cache: dict[str, torch.Tensor] = torch.load(path)
        if len(cache["ids"]) == n:
            return cache
    cache = build_cache(vae, tokenizer, seed, n)
    torch.save(cache, path)
    return cache


def diffusion_loss(
    scheduler: DDPMScheduler, pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Weighted v-prediction loss of a batch.

    v = sqrt(abar) * noise - sqrt(1 - abar) * x0, so a v error is an image (x0) error divided by
    sqrt(1 - abar): in image terms the plain v loss weighs each timestep by 1 + SNR. The weight here caps
    that at MIN_SNR (like min-SNR-gamma) and, unlike epsilon prediction with min-SNR weights (image weight
    SNR, about 0.005 at t = 999), keeps weight 1 at the noisiest steps, where the layout of the image (the
    position and size words, the unmasked area of an inpainting input) is decided.
    """
    target: torch.Tensor = scheduler.get_velocity(latents, noise, t)
    per_item = (pred - target).pow(2).mean(dim=(1, 2, 3))
    alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod.to(t.device)[t]
    snr_plus_one = 1 / (1 - alphas_cumprod)
    return (snr_plus_one.clamp(max=MIN_SNR) / snr_plus_one * per_item).mean()


def train_unet(
    vae_dir: Path, tokenizer_dir: Path, out: Path, seconds: float, seed: int, steps: int | None = None
) -> dict[str, float]:
    """Stage 2: train UNet + text encoder from scratch on SD's schedule; save the EMA weights to out."""
    return _train(vae_dir, tokenizer_dir, out, seconds, seed, steps, init=None, cache_seed=seed + 1)


def train_terminal(
    vae_dir: Path, tokenizer_dir: Path, t2i: Path, out: Path, seconds: float, seed: int, steps: int | None = None
) -> dict[str, float]:
    """Stage 2b: fine-tune the stage-2 UNet + text encoder on the shipped zero-terminal-SNR schedule."""
    return _train(vae_dir, tokenizer_dir, out, seconds, seed + 7, steps, init=t2i, cache_seed=seed + 1)


def _train(
    vae_dir: Path,
    tokenizer_dir: Path,
    out: Path,
    seconds: float,
    seed: int,
    steps: int | None,
    init: Path | None,
    cache_seed: int,
) -> dict[str, float]:
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    out.mkdir(parents=True, exist_ok=True)
    cache = load_or_build_cache(out.parent / "t2i-latents.pt", vae, tokenizer, cache_seed, N_LATENTS)
    scale = float(vae.config.scaling_factor)
    empty = token_ids(tokenizer, [""])[0]
    if init is None:
        text_encoder, unet = new_text_encoder(tokenizer), new_unet()
        scheduler, lr, warmup, p_high = sd_scheduler(), LR, WARMUP, 0.0
    else:
        unet, text_encoder = load_text_to_image(init)
        scheduler, lr, warmup, p_high = train_scheduler(), TERMINAL_LR, TERMINAL_WARMUP, P_HIGH_T
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = EMA(params, EMA_DECAY)
    gen = torch.Generator().manual_seed(seed)
    budget = Budget(seconds, warmup, steps)
    progress = Progress("unet" if init is None else "terminal")
    smooth, step = 0.0, 0
    n_t = scheduler.config.num_train_timesteps
    while not budget.done(step):
        idx = torch.randint(len(cache["ids"]), (BATCH,), generator=gen)
        latents = cache["mean"][idx] * scale
        ids = drop_prompts(cache["ids"][idx], empty, P_EMPTY_PROMPT, gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, n_t, (BATCH,), generator=gen)
        if p_high > 0 and budget.progress(step) < HIGH_T_UNTIL:
            high = torch.rand(BATCH, generator=gen) < p_high
            t = torch.where(high, torch.randint(HIGH_T, n_t, (BATCH,), generator=gen), t)
        noisy = scheduler.add_noise(latents, noise, t)
        set_lr(opt, lr, budget.factor(step))
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = diffusion_loss(scheduler, pred, latents, noise, t)
        optimise(loss, opt, params, ema)
        smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth, lr=lr * budget.factor(step))
        step += 1
    figures = finish_unet(ema, budget, progress, step, smooth)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    return figures


def load_text_to_image(folder: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Load the trained UNet and text encoder from a stage-2 output folder."""
    return (
        UNet2DConditionModel.from_pretrained(str(folder / "unet")),
        CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
    )
