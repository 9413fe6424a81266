"""Stage 5: fine-tune the VAE decoder alone, so the encoder (and every latent the UNets learnt) stays fixed."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from .data import render_dataset
from .loop import Budget, Progress, plain_step, recon_loss, seed_everything, set_lr
from .tensors import to_tensor
from .unet import N_LATENTS, load_or_build_cache
from .vae import N_HELD_OUT, held_out_psnr

log = logging.getLogger(__name__)

BATCH = 32
LR = 1e-3
WARMUP = 50


def train_decoder(
    vae_dir: Path, tokenizer_dir: Path, work: Path, out: Path, seconds: float, seed: int, steps: int | None = None
) -> dict[str, float]:
    """Decode posterior samples of the cached training latents; save the tuned VAE to out."""
    seed_everything(seed)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    cache = load_or_build_cache(work / "t2i-latents.pt", vae.eval(), tokenizer, seed + 1, N_LATENTS)
    # Same seed as the cache: item i is the image whose moments are cache[i].
    x_all = to_tensor(render_dataset(seed + 1, N_LATENTS)[0])
    held_out = to_tensor(render_dataset(seed + 10_000, N_HELD_OUT)[0])
    before = held_out_psnr(vae, held_out)
    vae.requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(decoder, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    budget = Budget(seconds, WARMUP, steps)
    progress = Progress("decoder")
    step = 0
    while not budget.done(step):
        idx = torch.randint(N_LATENTS, (BATCH,), generator=gen)
        mean, std = cache["mean"][idx], cache["std"][idx]
        z = mean + std * torch.randn(mean.shape, generator=gen)
        x = x_all[idx]
        set_lr(opt, LR, budget.factor(step))
        rec = vae.decode(z).sample
        loss, l1 = recon_loss(rec, x)
        plain_step(loss, opt)
        progress.step(step, loss=loss.item(), l1=l1.item())
        step += 1
    vae.eval()
    figures = {"steps": step, "seconds": budget.elapsed(), "psnr_before_db": before}
    figures["held_out_psnr_db"] = held_out_psnr(vae, held_out)
    progress.step(step, force=True, **figures)
    vae.save_pretrained(str(out), safe_serialization=True)
    return figures
