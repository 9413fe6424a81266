"""Stage 2: train the text-to-image UNet and the text encoder together on cached latents; stage 2b
("terminal"): fine-tune both on the shipped zero-terminal-SNR schedule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .configs import new_text_encoder, new_unet, sd_scheduler, train_scheduler
from .data import render_dataset
from .grammar import prompt_text
from .loop import EMA, Budget, Progress, UNetStage, autocast, finish_unet, optimise, seed_everything
from .loop import smooth as smoothed
from .tensors import encode_moments, to_tensor
from .text import drop_prompts, token_ids
from .tokenizer import MAX_LENGTH

log = logging.getLogger(__name__)

N_LATENTS = 20_000
BATCH = 64  # fit's default (the sweep's recorded runs); the CLI's --batch sets the shipped stages' (32)
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
        if cache["ids"].shape == (n, MAX_LENGTH):
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


def train_unet(stage: UNetStage, out: Path) -> dict[str, float | str]:
    """Stage 2: train UNet + text encoder from scratch on SD's schedule; save the EMA weights to out."""
    return _train(stage, out, None, stage.seed)


def train_terminal(stage: UNetStage, t2i: Path, out: Path) -> dict[str, float | str]:
    """Stage 2b: fine-tune the stage-2 UNet + text encoder on the shipped zero-terminal-SNR schedule."""
    return _train(stage, out, t2i, stage.seed + 7)


@dataclass(frozen=True)
class Recipe:
    """What one UNet stage's loop does; the shipped stages are STAGE2 and TERMINAL, other values are for the
    recipe sweep (`python -m training.shapes.sweep`)."""

    lr: float
    warmup: int
    p_high: float = 0.0
    high_until: float = HIGH_T_UNTIL
    p_mid: float = 0.0  # after high_until: this share of each batch from MID_T (sweep only)
    text_lr_mult: float = 1.0
    ema_decay: float = EMA_DECAY


STAGE2 = Recipe(LR, WARMUP)
TERMINAL = Recipe(TERMINAL_LR, TERMINAL_WARMUP, P_HIGH_T)
MID_T = (250, 750)


def _train(stage: UNetStage, out: Path, init: Path | None, seed: int) -> dict[str, float | str]:
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(str(stage.vae_dir)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(stage.tokenizer_dir))
    out.mkdir(parents=True, exist_ok=True)
    cache = load_or_build_cache(out.parent / "t2i-latents.pt", vae, tokenizer, stage.seed + 1, N_LATENTS)
    if init is None:
        text_encoder, unet = new_text_encoder(tokenizer), new_unet()
        scheduler, recipe = sd_scheduler(), STAGE2
    else:
        unet, text_encoder = load_text_to_image(init)
        scheduler, recipe = train_scheduler(), TERMINAL
    latents = cache["mean"] * float(vae.config.scaling_factor)
    empty = token_ids(tokenizer, [""])[0]
    budget = Budget(stage.seconds, recipe.warmup, stage.steps)
    progress = Progress("unet" if init is None else "terminal")
    ids, run = cache["ids"], (seed, "cpu", stage.precision, stage.batch)
    figures = fit(unet, text_encoder, latents, ids, empty, scheduler, recipe, budget, progress, *run)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    return figures


def fit(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty: torch.Tensor,
    scheduler: DDPMScheduler,
    recipe: Recipe,
    budget: Budget,
    progress: Progress,
    seed: int,
    device: str = "cpu",
    precision: str = "fp32",
    batch: int = BATCH,
) -> dict[str, float | str]:
    """Train UNet + text encoder on scaled latents (N x 4 x 16 x 16) and their prompts' token ids; leave the
    EMA weights in the models. Every random draw comes from one CPU generator, so a run on another device
    sees the same batches, noise and timesteps. precision "bf16" runs the forward pass under bf16 autocast
    (see loop.resolve_precision); the loss is taken in fp32."""
    unet.to(device).train()
    text_encoder.to(device).train()
    latents = latents.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    groups = [
        {"params": list(unet.parameters()), "mult": 1.0},
        {"params": list(text_encoder.parameters()), "mult": recipe.text_lr_mult},
    ]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=1e-2)
    ema = EMA(params, recipe.ema_decay)
    gen = torch.Generator().manual_seed(seed)
    smooth, step = 0.0, 0
    n_t = scheduler.config.num_train_timesteps
    while not budget.done(step):
        idx = torch.randint(len(ids), (batch,), generator=gen)
        x0 = latents[idx.to(device)]
        prompt = drop_prompts(ids[idx], empty, P_EMPTY_PROMPT, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, n_t, (batch,), generator=gen)
        if recipe.p_high > 0 and budget.progress(step) < recipe.high_until:
            high = torch.rand(batch, generator=gen) < recipe.p_high
            t = torch.where(high, torch.randint(HIGH_T, n_t, (batch,), generator=gen), t)
        elif recipe.p_mid > 0:
            mid = torch.rand(batch, generator=gen) < recipe.p_mid
            t = torch.where(mid, torch.randint(*MID_T, (batch,), generator=gen), t)
        t = t.to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        factor = budget.factor(step)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * factor * group["mult"]
        with autocast(precision, device):
            pred = unet(noisy, t, text_encoder(prompt)[0]).sample
        loss = diffusion_loss(scheduler, pred.float(), x0, noise, t)
        optimise(loss, opt, params, ema)
        if device == "cpu" or step % 50 == 0:  # .item() waits for an accelerator
            smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth, lr=recipe.lr * factor)
        step += 1
    return finish_unet(ema, budget, progress, step, smooth, precision, batch)


def load_text_to_image(folder: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Load the trained UNet and text encoder from a stage-2 output folder."""
    return (
        UNet2DConditionModel.from_pretrained(str(folder / "unet")),
        CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
    )
