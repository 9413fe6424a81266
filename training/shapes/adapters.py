"""Stage "adapters" (issue 23): two adapters for the shipped text-to-image model, trained on top of it, teaching
three colours the base language lacks (grammar.NEW_COLOURS: maroon, cream, teal).

- LORA_NAME (`shapes-<c1>-<c2>`), a LoRA (rank LORA_RANK) on the UNet's transformer blocks (attention,
  feed-forward and their in/out projections), its resnets' convolutions and its output convolution, and on the text
  encoder's attention and MLP projections, teaching two colour words (LORA_COLOURS) as shape colour and as
  background colour. The base training never saw the words, so the text-encoder LoRA learns to turn them into
  colour features and the UNet LoRA to draw them. Half of each batch is new-colour scenes with their renders as
  targets; the other half are base-language scenes whose target is the frozen base model's own prediction (and
  every prompt dropped for classifier-free guidance is the base model's unconditional prediction), so with the
  LoRA active the base language and the unconditional prediction stay what they were; those items weigh
  PRESERVE_WEIGHT times as much as the new-colour ones. The stage then refines it through its own sampler for
  REFINE_STEPS steps (refine.py), which lifts it from 79% to about 86% of held-out prompts (the record below), and
  optionally for REFINE_MORE_ROUNDS more rounds with the base language weighed more.
- TI_NAME (`shapes-<colour>`), a textual-inversion embedding: one vector in the text encoder's input embedding
  space for the token TI_TOKEN (`<colour>`), everything else frozen. The token is added to the tokenizer and a
  forward hook on the token embedding puts the trained vector at its positions. Saved as diffusers'
  learned-embeds layout ({TI_TOKEN: float32 [TI_VECTORS, 64]}), which `pipe.load_textual_inversion(path,
  token=TI_TOKEN)` reads. The stage trains one for each of grammar.TI_CANDIDATES and ships TI_COLOUR's.

Both train on the shipped VAE's encodings of rendered scenes (a fresh latent_dist.sample() per use, as the base
training does; the LoRA's new-colour scenes with their means refined by decoder inversion, INVERT_STEPS) with the
shipped zero-terminal-SNR schedule and the stage-2 loss (v-prediction, min-SNR weights), fp32, with a fixed step
count and a cosine learning-rate decay. The colours are ones the VAE can draw (it only ever saw the 8 base colours;
an earlier version's pink and cyan came back white and blue, and latent corrections for them were off-distribution
and hurt the base language); its encoder loses some of them (grammar.NEW_COLOURS), which the inversion undoes.
The shipped files were trained against the stage-1 decoder, through which neither met its target; the family's
decoder was then widened to these colours (the palette stage, palette.py), and through it both do.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from .configs import train_scheduler
from .data import attributes_with, place, random_attributes, render
from .evaluate import EXTENDED_PALETTE, judge, score
from .grammar import COLOURS, LORA_COLOURS, TI_COLOUR, TI_TOKEN, Attributes, prompt_text
from .loop import Budget, Progress, seed_everything
from .loop import smooth as smoothed
from .tensors import encode_moments, invert_decoder, to_images, to_tensor
from .text import drop_prompts, token_ids
from .unet import MIN_SNR, P_EMPTY_PROMPT

log = logging.getLogger(__name__)

LORA_NAME = "shapes-" + "-".join(LORA_COLOURS)
TI_NAME = f"shapes-{TI_COLOUR}"
WEIGHTS = "adapter.safetensors"
LORA_RANK = 8
# Attention alone (the first version: 250 steps, new colours right in 43.8%) could not move the drawn colours far
# enough; the convolutions draw them. Measured on the 96-prompt grids: these targets, lr 3e-3, PRESERVE_WEIGHT 4,
# 1200 steps: 71.9% with the base language at most 3.4 points worse; the same at lr 6e-3 without the extra weight on
# the base items: 75.0% but the base prompts' shapes 26 points worse; the transformer blocks alone (lr 6e-3, no extra
# weight): 67.7%, positions 17 points worse. The shipped recipe for 2400 steps: 71.9% again (a plateau). Then the
# targets: with the new-colour scenes' latents refined by decoder inversion (INVERT_STEPS), 79.2%
# (base language at most 2.3 points worse); the same at rank 16: 77.1%; with the new colour in the shape 3 times
# in 4: 75.0%; at lr 6e-3: 71.9% and positions 10 points worse; with a smoothness term in the inversion (0.1 times
# the total variation of the correction, which halves it): 75.0%; for 2400 steps: 77.1% (a plateau again); with the
# new-colour items' loss not damped at low noise (weight 1 at every timestep, not min-SNR's): 74.0%; with grey in
# place of teal: 80.2%, shape class 59%; with teal in two thirds of the new-colour scenes: 79.2% again. Textual
# inversion gained nothing from the refined
# latents (44.8% against 52.1%), nor from 4 vectors (49.0%), so it trains on the plain encodings.
# Refining the 79.2% LoRA through its sampler (refine.py, DRaFT), 150 steps: a colour term alone (no recoloured
# target, base language kept only by this loss on single timesteps): 52.1%, shapes filling the image; with this
# loss on real latents beside it: 87.5%, base sizes 39 points worse; the recoloured-target distance alone (base
# images weighed 1): 80.2%, base at most 3.5 points worse; both (base weight 2): 90.6%, base sizes 38 points worse;
# the colour term's shape mask eroded by 2 pixels: 91.7%, sizes 12 points worse; the mask's sigmoid tail, which
# put every background pixel on the shape's mean and so rewarded a bigger shape, cut to exactly 0 (120 steps,
# base weight 4): the shipped figures (the LoRA card). The same refinement of the first phase's embedding (maroon's
# stand-ins red or black, prompts of 4, lr 1e-2, only the vector trained; refine.refine_ti): 60 steps, 59.4%
# against 52.1%; 200 steps, 72.9%; 200 more from there, 67.7%; 150 more at batch 8, 66.7%; 200 more as 4 vectors
# (the vector repeated), 49.0%, positions 31% right. Those ran in an experiment script with its own seeds; the
# stage's own 200 steps (TI_REFINE_STEPS) give the shipped 69.8% (the embedding's card); the same with the colour
# term weighed 4, 68.8%; the gradient through the last 5 sampling steps only (DRaFT-K), 67.7%; cream as the
# embedding's colour, 2.1% after the first phase and 44.8% refined. Then, from the shipped embedding: 200 more steps
# on prompts whose other slot is red, black or green half the time (the slots it misses most), 74.0%, and 200 more
# after that, 69.8%; 200 more as 2 vectors (the vector repeated), 74.0% but positions 51% right; an evolution
# strategy on the hit rate itself (6 antithetic pairs, 32 fresh prompts a generation, 10 generations), 70.8%. Every
# figure in this record is of the tuning grids (adapter_eval), on which every choice was made. On fresh 192-prompt
# grids of the same design (adapter_eval.FRESH_SEED and the next seed) the shipped LoRA reads 84.9% and 82.8% (base
# language at most 4.7 points worse), the shipped embedding 60.4% and 58.3%, the hard-slot one 66.1% and 60.4%.
# Half the LoRA's misses on a fresh grid are prompts with both its colours (a teal shape on cream drawn yellow, a
# cream shape on teal drawn green or white); refining the first phase with both colours in 30% of the new-colour
# prompts (120 steps, otherwise the stage's recipe): 90.6% on the tuning grid, 84.9% on the seed-3 fresh grid
# against the shipped 82.8%, within a 192-prompt grid's noise, so not shipped. The shipped LoRA refined 120 more
# steps (a fresh cosine schedule, otherwise the stage's recipe): 93.8% on the tuning grid and 88.5% on the seed-3
# fresh grid, but base prompts' size words 4.5 (tuning) and 5.4 (seed-3 fresh base grid) points worse: the lead for
# the next run, with more weight on the base language; not shipped. The same with the base images weighed 8
# (refine.BASE_WEIGHT): 91.7% tuning, 88.0% seed-3 fresh, base language at most 3.4 (tuning) and 2.1 (seed 3)
# points worse: the candidate to build on (made by a script, not yet by the stage). 120 more steps from there, the
# same way: 90.6% tuning, 89.1% seed 3. refine.proxied stands in for the shape's new colour only, so a prompt with
# a new colour in both slots (about 1 in 9 of the LoRA's) prompts the teacher with a background word it does not
# know; standing in for both (green on yellow, recoloured to teal on cream) looked like the fix and was tried. The
# stage with it and two later rounds at base weight 8 (--refine-more-rounds 2, 120 steps each, seeds 1 and 2):
# 84.9% seed 3, base language at most 3.6 points worse (seed 3). On 768 more prompts no run was chosen on
# (lora_grid seeds 4 to 7, 192 each; one 192-prompt grid's standard error is about 2.5 points, which is how runs
# came to look 4 points apart on seed 3): the shipped LoRA 86.2%, that stage run 86.1%, the script's shipped + 120
# at base weight 8 88.2% (with both stood in, from the same start, prompts and noise: 85.4%) and shipped + 120 +
# 120 at base weight 8 87.9%. So more of this refinement moves the rate by 2 points at most (and a fresh run of the
# recipe not even that), short of 90%; nothing was shipped (REFINE_MORE_ROUNDS stays 0, the shipped recipe). The
# prompts with both colours (149 of lora_grid seeds 4 to 11) are the weak class: shape colour right in 27.5%
# (shipped), 41.6% (shipped + 120 at base weight 8), and with both stood in 18.1% (the same from the same start)
# and 14.8% (the stage run); backgrounds 95-96% in all four. So proxied keeps the one stand-in. The class is a
# tenth of a grid, so its spread between runs alone moves the headline figure by 1 to 3 points. Within it, a teal
# shape on cream is almost never right (shipped 1 of 72, shipped + 120 at base weight 8 4 of 72; judged yellow 46
# and 39 times, green 25 and 28), while a cream shape on teal is right 40 and 58 times of 77: the gain of that run
# is all cream on teal, and teal on cream is the case to work on next. Its images show why it is judged yellow: a
# dark teal shape in a ring of saturated yellow on a mottled cream field (yellow and white patches), and the ring
# and patches outnumber a small shape's pixels. The 20 inversion steps leave the same ring on some of the training
# targets (a teal shape on cream: 15 of 32 decode right after 20 steps, 28 after 100), so the stage was run with
# the targets checked (--invert-more-steps 80, INVERT_MORE_STEPS; 1409 of 1536 scenes kept): 85.9% seed 3, 86.3%
# on the 768 (shipped 86.2%), both-colour prompts' shape colour 32.2% (shipped 27.5%), base size words 7.0 points
# worse on the seed-3 base grid (the shipped file at most 4.7 on a fresh base grid). Its first phase alone draws
# the same ring and mottle. So the ring is not learnt from the data: the shipped VAE, which never saw cream, turns
# small errors in a sampled latent around cream into yellow and white, and the exact latents that avoid it (found
# by 100 inversion steps) are not what the UNet samples. Measured: Gaussian noise of 0.3 added to such exact latents
# (their own spread is about 1.7) keeps 14 of 30 teal-on-cream decodes right and 23 of 28 red-on-cream, against
# 32 of 32 for green on yellow, blue on white and teal on white. Like the embedding's maroon, that points at a base
# model (VAE first) trained on more colours than it names. The check stays an option, off by default. A colour
# term pulling every pixel nearer the background colour than the shape colour to the background (not only the
# border), from the shipped file + 120 steps at base weight 8 as above (same start, prompts and noise): 86.6% on
# the 768 against 88.2%, both-colour shapes 38.3% against 41.6%; the cream field came out cleaner and the ring
# stayed, so it was not kept. The class is the gap: 37 of the 768 prompts are a teal shape on cream, right about
# once in 72, and drawn right they would lift the shipped 86.2% to about 90.9%. So the decoder was widened instead
# (the palette stage, palette.py: the decoder alone fine-tuned on base and new-colour scenes with noisy latents; UNet,
# text encoder and encoder untouched), and through it the same two files, unchanged, meet their targets (their
# cards; palette.py's record has the before and after of each grid). Every figure above is through the stage-1
# decoder.
UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_out",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LORA_STEPS = 1200
LORA_LR = 3e-3
# The weight of the items whose target is the frozen base model's prediction (base language, dropped prompts)
# against the new-colour items: above 1, keeping the base language matters more than learning fast.
PRESERVE_WEIGHT = 4.0
TI_STEPS = 200
TI_COMPARE_STEPS = 80  # steps of each candidate's embedding in the comparison that picks TI_COLOUR
TI_LR = 1e-2
TI_VECTORS = 1
BATCH = 16
N_SCENES = 1536  # rendered scenes per data set (new colours; base language)
WARMUP = 30
# Decoder inversion of the adapters' new-colour scenes (render_scenes(invert=...)): encoded by the shipped VAE, a
# held-out grid's renders come back right in only 67% (maroon) and 91% (cream and teal) of scenes, a ceiling on
# what an adapter trained on those latents can draw; 20 Adam steps at 0.1 bring back 95 of 96 (maroon, teal).
INVERT_STEPS = 20
INVERT_LR = 0.1
# ... but those 20 steps leave a sixth of the LoRA's scenes decoding as something else (judged on every attribute:
# 321 of its first 384 scenes right; a teal shape on cream gets a yellow ring and is judged yellow, the LoRA's
# commonest miss). With --invert-more-steps N (AdapterRun.invert_more_steps) the scenes still wrong get N more,
# and those still wrong after that are left out (checked_inversion), so every target decodes as its prompt. At 80:
# 1409 of 1536 kept, and the stage's LoRA drew no better for it (the record above), so the default is 0, the
# shipped file's recipe (plain INVERT_STEPS, every scene kept).
INVERT_MORE_STEPS = 0
REFINE_STEPS = 120  # steps of refine.refine_lora after train_lora (its constants are there)
TI_REFINE_STEPS = 200  # steps of refine.refine_ti after train_ti
# The LoRA's later refining rounds, after the first REFINE_STEPS: each REFINE_MORE_STEPS steps of refine.refine_lora
# with a fresh cosine schedule, fresh prompts and noise (seed + round) and the base images weighed
# refine.MORE_BASE_WEIGHT.
REFINE_MORE_ROUNDS = 0  # the shipped LoRA so far; see the record above
REFINE_MORE_STEPS = 120


@dataclass(frozen=True)
class AdapterRun:
    """What the adapters stage is given: the base model folder, seed, step counts (LoRA, shipped embedding, each
    candidate embedding in the comparison), batch size, scenes per data set and the LoRA's and the shipped
    embedding's refining steps (refine.py), the LoRA's later refining rounds and their steps each, and the
    further inversion steps of its scenes that decode wrong (0: no check; render_scenes)."""

    model: Path
    seed: int = 0
    lora_steps: int = LORA_STEPS
    ti_steps: int = TI_STEPS
    batch: int = BATCH
    n_scenes: int = N_SCENES
    ti_compare_steps: int = TI_COMPARE_STEPS
    refine_steps: int = REFINE_STEPS
    ti_refine_steps: int = TI_REFINE_STEPS
    refine_more_rounds: int = REFINE_MORE_ROUNDS
    refine_more_steps: int = REFINE_MORE_STEPS
    invert_more_steps: int = INVERT_MORE_STEPS


@dataclass
class Base:
    """The shipped model's parts, loaded in fp32."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL


def load_base(model: Path) -> Base:
    """Load tokenizer, text encoder, UNet and VAE of a text-to-image folder (fp32, frozen, eval mode)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder"), dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"), torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32)
    for m in (text_encoder, unet, vae):
        m.requires_grad_(False).eval()
    return Base(tokenizer, text_encoder, unet, vae)


@dataclass
class Scenes:
    """Posterior moments (unscaled) of rendered scenes' latents, the VAE's scaling factor and the prompts' token ids."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    ids: torch.Tensor

    def latents(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled latent samples of items idx (a fresh latent_dist.sample() of each)."""
        noise = torch.randn(self.std[idx].shape, generator=gen)
        return (self.mean[idx] + self.std[idx] * noise) * self.scale


def render_scenes(
    base: Base,
    draw: Callable[[random.Random], Attributes],
    tag: str,
    n: int,
    words: Mapping[str, str] | None = None,
    invert: int = 0,
    invert_more: int = 0,
) -> Scenes:
    """Render n scenes whose attributes draw() picks (item i seeded by tag and i), encode (posterior moments, drawn
    from afresh each batch as the base training's latent_dist.sample()) and tokenise them. With invert > 0, the
    means are refined by that many steps of decoder inversion (tensors.invert_decoder), so the targets decode as
    the scenes' colours; with invert_more > 0 too, the scenes that still decode wrong get that many more and those
    still wrong are left out (checked_inversion)."""
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    scenes = []
    for i in range(n):
        rng = random.Random(f"adapters:{tag}:{i}")
        scenes.append(place(draw(rng), rng))
        images[i] = np.asarray(render(scenes[-1]))
    x = to_tensor(images)
    mean, std = encode_moments(base.vae, x)
    if invert and not invert_more:
        mean = invert_decoder(base.vae, x, mean, invert, INVERT_LR)
    if invert and invert_more:
        mean, kept = checked_inversion(base.vae, x, mean, [s.attrs for s in scenes], invert, invert_more)
        log.info("stage=adapters scenes=%s inverted kept=%d of %d", tag, len(kept), n)
        mean, std, scenes = mean[kept], std[kept], [scenes[i] for i in kept]
    prompts = [prompt_text(s.attrs, words) for s in scenes]
    return Scenes(mean, std, float(base.vae.config.scaling_factor), token_ids(base.tokenizer, prompts))


def decodes_as(vae: AutoencoderKL, mean: torch.Tensor, attrs: Sequence[Attributes], batch: int = 64) -> list[bool]:
    """Whether each latent mean decodes to an image judged (extended palette) right on every attribute."""
    with torch.no_grad():
        images = [im for i in range(0, len(mean), batch) for im in to_images(vae.decode(mean[i : i + batch]).sample)]
    return [all(score(judge(im, EXTENDED_PALETTE), a).values()) for im, a in zip(images, attrs, strict=True)]


def checked_inversion(
    vae: AutoencoderKL, x: torch.Tensor, mean: torch.Tensor, attrs: Sequence[Attributes], steps: int, more: int
) -> tuple[torch.Tensor, list[int]]:
    """Decoder inversion (steps, then `more` steps for the items whose decode is not judged as attrs); return the
    refined means and the indices of the items that decode as their attrs (the rest are left out)."""
    mean = invert_decoder(vae, x, mean, steps, INVERT_LR)
    wrong = [i for i, ok in enumerate(decodes_as(vae, mean, attrs)) if not ok]
    if wrong:
        idx = torch.tensor(wrong)
        mean = mean.clone()
        mean[idx] = invert_decoder(vae, x[idx], mean[idx], more, INVERT_LR)
    still = {wrong[j] for j, ok in enumerate(decodes_as(vae, mean[wrong], [attrs[i] for i in wrong])) if not ok}
    return mean, [i for i in range(len(mean)) if i not in still]


def weighted_loss(
    scheduler: DDPMScheduler,
    pred: torch.Tensor,
    target: torch.Tensor,
    t: torch.Tensor,
    item_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """unet.diffusion_loss with a given v target: per-item MSE, image-space weight capped at MIN_SNR, each item
    times its weight (item_weights; default 1)."""
    per_item = (pred - target).pow(2).mean(dim=(1, 2, 3))
    if item_weights is not None:
        per_item = per_item * item_weights
    alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod[t]
    snr_plus_one = 1 / (1 - alphas_cumprod)
    loss: torch.Tensor = (snr_plus_one.clamp(max=MIN_SNR) / snr_plus_one * per_item).mean()
    return loss


def _lora_config(targets: Sequence[str]) -> LoraConfig:
    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=list(targets))


def _draw_batch(
    gen: torch.Generator, new: Scenes, old: Scenes, batch: int, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, token ids and the teacher mask (True: target is the base model's prediction) of one batch:
    the first half new-colour scenes, the rest base-language scenes, prompts dropped at P_EMPTY_PROMPT."""
    k = batch // 2
    i_new = torch.randint(len(new.ids), (k,), generator=gen)
    i_old = torch.randint(len(old.ids), (batch - k,), generator=gen)
    x0 = torch.cat([new.latents(i_new, gen), old.latents(i_old, gen)])
    ids = torch.cat([new.ids[i_new], old.ids[i_old]])
    dropped = drop_prompts(ids, empty, P_EMPTY_PROMPT, gen)
    teacher = (torch.arange(batch) >= k) | (dropped != ids).any(dim=1)
    return x0, dropped, teacher


def lora_scenes(base: Base, run: AdapterRun) -> tuple[Scenes, Scenes]:
    """The LoRA's data: new-colour scenes (latents refined by decoder inversion) and base-language scenes."""
    colours = [*COLOURS, *LORA_COLOURS]
    draw: Callable[[random.Random], Attributes] = lambda r: attributes_with(r, list(LORA_COLOURS), colours)  # noqa: E731
    new = render_scenes(base, draw, "lora", run.n_scenes, invert=INVERT_STEPS, invert_more=run.invert_more_steps)
    return new, render_scenes(base, random_attributes, "base", run.n_scenes)


def train_lora(run: AdapterRun, base: Base, new: Scenes, old: Scenes) -> dict[str, float]:
    """Train the LoRA of LORA_COLOURS on the scenes new and old (lora_scenes), attached to base's UNet and text
    encoder; return figures."""
    seed_everything(run.seed)
    teacher_unet, teacher_text = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    base.unet.add_adapter(_lora_config(UNET_TARGETS))
    # peft's injection, not transformers' add_adapter (which wants peft >= 0.22; the project pins 0.21.2)
    inject_adapter_in_model(_lora_config(TEXT_TARGETS), base.text_encoder)
    params = [p for m in (base.unet, base.text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LORA_LR, weight_decay=0.0)
    scheduler, gen = train_scheduler(), torch.Generator().manual_seed(run.seed)
    empty = token_ids(base.tokenizer, [""])[0]
    budget, progress, smooth = Budget(0.0, WARMUP, run.lora_steps), Progress("lora"), 0.0
    base.unet.train()
    base.text_encoder.train()
    for step in range(run.lora_steps):
        x0, ids, use_teacher = _draw_batch(gen, new, old, run.batch, empty)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (run.batch,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            taught = teacher_unet(noisy, t, teacher_text(ids)[0]).sample
        target = torch.where(use_teacher[:, None, None, None], taught, scheduler.get_velocity(x0, noise, t))
        keep = torch.where(use_teacher, PRESERVE_WEIGHT, 1.0)
        loss = weighted_loss(scheduler, base.unet(noisy, t, base.text_encoder(ids)[0]).sample, target, t, keep)
        _step(opt, loss, params, LORA_LR * budget.factor(step))
        smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth)
    base.unet.eval()
    base.text_encoder.eval()
    return {"steps": run.lora_steps, "seconds": budget.elapsed(), "final_loss": smooth, **scene_counts(run, new)}


def scene_counts(run: AdapterRun, new: Scenes) -> dict[str, float]:
    """The new-colour scenes rendered and kept (with run.invert_more_steps, render_scenes leaves out those whose
    target does not decode as the prompt)."""
    return {"scenes": len(new.ids), "scenes_rendered": run.n_scenes, "invert_more_steps": run.invert_more_steps}


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter], lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The injected "default" LoRA's weights keyed as get_peft_model_state_dict keys them (no adapter name), under
    "text_model." as CLIPTextModel's modules were named before transformers 5 (diffusers strips it where needed)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            key = k.replace(".default.", ".")
            out[key if key.startswith("text_model.") else f"text_model.{key}"] = v.detach().clone()
    return out


def save_lora(base: Base, folder: Path) -> Path:
    """Write the trained LoRA as folder/adapter.safetensors in diffusers' layout (unet.* and text_encoder.*)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=get_peft_model_state_dict(base.unet),
            text_encoder_lora_layers=lora_state_dict(base.text_encoder),
            safe_serialization=True,
        )
        shutil.copyfile(Path(tmp) / "pytorch_lora_weights.safetensors", folder / WEIGHTS)
    return folder / WEIGHTS


def placeholder_tokens(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding as diffusers' load_textual_inversion names them: token, token_1, ..."""
    return [token, *(f"{token}_{i}" for i in range(1, n))]


def add_placeholders(base: Base, tokens: Sequence[str]) -> list[int]:
    """Add the tokens to the tokenizer and a row for each to the text encoder; return their ids."""
    base.tokenizer.add_tokens(list(tokens))
    base.text_encoder.resize_token_embeddings(len(base.tokenizer))
    return [int(base.tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def colour_embedding_mean(base: Base) -> torch.Tensor:
    """Mean input embedding of the base colour words (the embedding's starting point)."""
    ids = [base.tokenizer(c, add_special_tokens=False).input_ids[0] for c in COLOURS]
    weight: torch.Tensor = base.text_encoder.get_input_embeddings().weight
    return weight[ids].mean(0).detach().clone()


def train_ti(run: AdapterRun, colour: str = TI_COLOUR) -> tuple[torch.Tensor, dict[str, float]]:
    """Train the embedding of the token `<colour>`: TI_VECTORS x 64 (the prompt's token standing for TI_VECTORS
    positions, as diffusers and the server expand it), everything else frozen; return it and figures."""
    seed_everything(run.seed + 1)
    base = load_base(run.model)
    tokens = placeholder_tokens(f"<{colour}>", TI_VECTORS)
    vectors = torch.nn.Parameter(colour_embedding_mean(base).repeat(TI_VECTORS, 1))
    with with_embedding(base, tokens, vectors):
        return vectors.detach().float().clone(), _fit_ti(run, base, colour, tokens, vectors)


def _fit_ti(
    run: AdapterRun, base: Base, colour: str, tokens: Sequence[str], vectors: torch.nn.Parameter
) -> dict[str, float]:
    """train_ti's loop, with the embedding hooked into base (with_embedding)."""
    draw: Callable[[random.Random], Attributes] = lambda r: attributes_with(r, [colour], list(COLOURS))  # noqa: E731
    scenes = render_scenes(base, draw, f"ti-{colour}", run.n_scenes, {colour: " ".join(tokens)})
    opt = torch.optim.AdamW([vectors], lr=TI_LR, weight_decay=0.0)
    scheduler, gen = train_scheduler(), torch.Generator().manual_seed(run.seed + 1)
    budget, progress, smooth = Budget(0.0, WARMUP, run.ti_steps), Progress("ti"), 0.0
    for step in range(run.ti_steps):
        idx = torch.randint(len(scenes.ids), (run.batch,), generator=gen)
        x0 = scenes.latents(idx, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (run.batch,), generator=gen)
        pred = base.unet(scheduler.add_noise(x0, noise, t), t, base.text_encoder(scenes.ids[idx])[0]).sample
        loss = weighted_loss(scheduler, pred, scheduler.get_velocity(x0, noise, t), t)
        _step(opt, loss, [vectors], TI_LR * budget.factor(step))
        smooth = smoothed(smooth, loss.item(), step)
        progress.step(step, loss=smooth)
    return {"steps": run.ti_steps, "seconds": budget.elapsed(), "final_loss": smooth}


@contextmanager
def with_embedding(base: Base, tokens: Sequence[str], vectors: torch.Tensor) -> Iterator[list[int]]:
    """Add the tokens to base (add_placeholders) and, while inside, make the text encoder read vectors[k] (live, so
    gradients reach them) for tokens[k]; yield the tokens' ids."""
    placeholders = add_placeholders(base, tokens)

    def inject(_m: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        for k, placeholder in enumerate(placeholders):
            out = torch.where((inputs[0] == placeholder)[..., None], vectors[k], out)
        return out

    hook = base.text_encoder.get_input_embeddings().register_forward_hook(inject)
    try:
        yield placeholders
    finally:
        hook.remove()


def save_ti(vectors: torch.Tensor, folder: Path, token: str = TI_TOKEN) -> Path:
    """Write {token: float32 [n, 64]} as folder/adapter.safetensors (diffusers' learned_embeds layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({token: vectors.contiguous()}, str(folder / WEIGHTS))
    return folder / WEIGHTS
