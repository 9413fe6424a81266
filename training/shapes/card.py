"""Model cards (README.md) for the two folders, filled from the training report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import __doc__ as GEOMETRY
from .evaluate import __doc__ as SCORING
from .export import INPAINT_NAME, T2I_NAME
from .grammar import COLOURS, GRAMMAR, SHAPES

# The probe picture, relative to a card in models/<name>/README.md.
SQUARES_SHEET = "../../docs/images/shapes-squares-probe.png"
TARGETS = {"background": 0.98, "colour": 0.95, "shape": 0.90, "size": 0.85, "position": 0.85}
LABELS = {
    "background": "background colour",
    "colour": "shape colour",
    "shape": "shape class",
    "size": "size word",
    "position": "position word",
}


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "not measured"


def _minutes(stage: dict[str, Any] | None) -> str:
    if not stage:
        return "not run"
    return f"{stage.get('steps', '?')} steps, {stage.get('seconds', stage.get('wall_seconds', 0)) / 60:.1f} min"


def _guidance(ev: dict[str, Any]) -> float:
    return float(ev.get("default_guidance", 7.5))


def _at_default(ev: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = ev.get(f"guidance_{_guidance(ev):g}", {})
    return figures


def _eval_table(ev: dict[str, Any]) -> str:
    columns = {f"guidance_{g:g}": f"guidance {g:g}" for g in dict.fromkeys((_guidance(ev), 7.5, 1.0))}
    columns[f"guidance_{_guidance(ev):g}"] += " (default)"
    rows = [
        "| attribute | " + " | ".join(columns.values()) + " | target (default) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for key, label in [*LABELS.items(), ("all", "all attributes right")]:
        cells = " | ".join(_pct(ev.get(c, {}).get(key)) for c in columns)
        target = f"{TARGETS[key]:.0%}" if key in TARGETS else ""
        rows.append(f"| {label} | {cells} | {target} |")
    return "\n".join(rows)


def _geometry() -> str:
    lines = (GEOMETRY or "").split("\n")[2:]
    return "\n".join(line.strip() and line for line in lines).strip()


def _scoring() -> str:
    lines = (SCORING or "").split("\n")[2:]
    return "\n".join(line.strip() and line for line in lines).strip()


def _total_minutes(report: dict[str, Any]) -> float:
    stages = ("vae", "unet", "terminal", "inpaint", "decoder")
    seconds: float = sum(report.get(k, {}).get("wall_seconds", 0.0) for k in stages)
    return seconds / 60


def _runs(report: dict[str, Any]) -> str:
    runs = report.get("runs") or [report.get("command", "?")]
    lines = []
    for run in runs:
        command, _, note = run.partition("  (")
        lines.append(f"  - `{command}`" + (f" ({note}" if note else ""))
    return "\n".join(lines)


def _known_problems(ev: dict[str, Any], notes: list[str]) -> str:
    gd, g, g1 = _at_default(ev), _guidance(ev), ev.get("guidance_1", {})
    if not gd:
        return "- Not evaluated yet."
    lines = [
        f"- Misses its target: {LABELS[k]} {_pct(gd.get(k))} (target {TARGETS[k]:.0%})."
        for k in TARGETS
        if isinstance(gd.get(k), (int, float)) and gd[k] < TARGETS[k]
    ]
    if not lines:
        lines.append(f"- Meets every accuracy target at 20 DDIM steps and guidance {g:g}.")
    if g1 and g != 1.0:
        lines.append(
            f"- Guidance matters: all attributes are right for {_pct(gd.get('all'))} of the prompts at the default"
            f" guidance {g:g}, {_pct(ev.get('guidance_7.5', {}).get('all'))} at 7.5 and {_pct(g1.get('all'))} at 1.0."
        )
    lines += [f"- {note}" for note in notes]
    lines.append("- 64x64 only, flat colours only: the training data has nothing else.")
    return "\n".join(lines)


def _fp16_note(ev: dict[str, Any]) -> str:
    ref, stored = ev.get("fp32_reference"), _at_default(ev)
    if not ref or not stored:
        return "the fp32 comparison has not been run"
    worst = max(abs(ref[k] - stored.get(k, 0.0)) for k in ref)
    return (
        f"upcast fp16 and the fp32 original differ by at most {100 * worst:.1f} points on any accuracy"
        f" and their images by {ev.get('fp16_vs_fp32_psnr_db', 0):.0f} dB PSNR on average"
    )


def text_to_image_card(report: dict[str, Any]) -> str:
    """README.md of the text-to-image folder."""
    ev = report.get("eval", {})
    ex = report.get("export", {})
    ref = ev.get("fp32_reference", {})
    total = ex.get("total_weight_bytes")
    g = _guidance(ev)
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
license: apache-2.0
tags: [stable-diffusion, tiny, synthetic, sdserve]
---

# shapes

A tiny text-to-image model with the Stable Diffusion 1.x architecture (AutoencoderKL, CLIP text
encoder, UNet2DConditionModel, DDIM scheduler), trained from scratch on procedurally drawn
images of one coloured shape on a plain background. It is sdserve's embedded default model:
small enough to ship with the service and to run in tests on a CPU, yet real enough that its
output can be checked by a pixel scorer. Its inpainting sibling is `{INPAINT_NAME}`.

## What it can and cannot do

- Draws 64x64 images of one circle, square or upward triangle in one of {len(COLOURS)} flat colours
  on a flat background of another colour, with an optional size and position.
- It knows exactly the prompt language below and nothing else: other words are tokenised
  byte by byte and mean nothing to it; two shapes, rotations, textures, other colours or
  other image sizes are out of reach. Other resolutions technically run but are off-distribution.
- Not a general image model, not for anything but testing and demonstrating the service.

## Prompt language

```
{GRAMMAR}
```

- colours: {", ".join(COLOURS)}; the shape colour differs from the background colour
- shapes: {", ".join(SHAPES)}
- example: `a small red circle on the left on a blue background`, `a yellow square on a black background`

{_geometry()}

## Use

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained(
    "models/shapes", safety_checker=None, feature_extractor=None, requires_safety_checker=False
)
image = pipe("a large green triangle at the top on a white background",
             num_inference_steps=20, guidance_scale={g:g}).images[0]
```

Defaults for the service (`sdserve.json`): 20 steps, guidance {g:g}, 64x64, DDIM (trailing
timesteps, zero-terminal-SNR betas, v-prediction); `latent_rgb`
is a least-squares projection of one latent pixel (4 values, scaled latents) to RGB in [-1, 1]
for step previews; `inpaint_model` names the inpainting sibling.

## Files

- `unet/`: 3.9M parameters, stored in **fp16**; loaders upcast it to the requested dtype (fp32
  by default). fp16 keeps both folders under the 30 MB budget without shrinking the UNet the
  recipe was proven with; {_fp16_note(ev)}.
- `vae/` (0.68M parameters, 3 blocks of 16/32/64 channels, 16x16x4 latents), `text_encoder/`
  (2 layers, width 64, 77 positions), `tokenizer/` (byte-level BPE whose merges make each word
  of the language one token; `vocab.json` + `merges.txt` beside `tokenizer.json`), all fp32,
  identical in both folders.
- Weights of both folders together: {total if total is not None else "?"} bytes.

## Training

- Command: `{report.get("command", "python -m training.shapes --out models")}` (code in `training/shapes/`).
- Machine: {report.get("machine", "?")}, CPU only, time-boxed: the learning rate follows a
  warm-up + cosine schedule over elapsed time, so any machine ends fully decayed. Data, masks,
  initialisation and sampling noise are seeded; `--vae-steps`, `--unet-steps`, `--terminal-steps`,
  `--inpaint-steps` and `--decoder-steps` switch the schedules to fixed step counts for a run that does
  not depend on machine speed.
- VAE: {_minutes(report.get("vae"))}; L1 + MSE + 1e-6 KL, AdamW 2e-3, batch 16, a quarter of the
  images with a zeroed inpainting mask; held-out PSNR {report.get("vae", {}).get("held_out_psnr_db", 0):.1f} dB;
  scaling factor {report.get("vae", {}).get("scaling_factor", 0):.4f} (1 / std of sampled latents).
- UNet + text encoder: {_minutes(report.get("unet"))}; the posterior means of 20,000 cached latents
  (not posterior samples: this VAE's posterior noise is as large as the latent difference between a
  circle and a square, which drowned the shape class in the loss), v-prediction, SD scaled-linear
  betas, loss weight min(1 + SNR, 5) / (1 + SNR) (in image terms: weight 1 at the noisiest steps,
  where the layout is decided, up to 5 at the cleanest), empty prompt 10% of the time, AdamW 1e-3
  (150 warm-up steps), batch 64, EMA 0.998.
- Zero-terminal-SNR fine-tune of both (stage 2b, `terminal`): {_minutes(report.get("terminal"))}; the same
  betas rescaled so that t = 999 is pure noise (alphas_cumprod floored at 1e-4, so the first sigma is
  100 rather than infinite), 40% of each batch from t >= 850 in the first half of the stage and uniform
  timesteps after it, AdamW 3e-4 (50 warm-up steps). Why: on the plain schedule a t = 999 input still
  holds 6.8% of the image and the UNet took the shape's position from that residue rather than from the
  prompt (position words at chance after stage 2). The shipped scheduler config carries these betas as
  `trained_betas` with trailing timesteps, so every scheduler the service offers samples on the schedule
  the UNet was trained on.
- VAE decoder fine-tune (encoder frozen, so the latents the UNets learnt do not move):
  {_minutes(report.get("decoder"))}; L1 + MSE on decoded posterior samples of the 20,000 training
  latents, AdamW 1e-3, batch 32; held-out PSNR {report.get("decoder", {}).get("held_out_psnr_db", 0):.1f} dB.
- Latent RGB projection fit: RMSE {ex.get("latent_rgb_rmse", 0):.3f} (in [-1, 1] units) against the
  box-downsampled decode: a rough preview only, this VAE's latents are far from linear in colour.
- Wall time of the training stages: {_total_minutes(report):.0f} min. How the shipped folders were actually made:
{_runs(report)}

## How the recipe and the default guidance were chosen

`python -m training.shapes.sweep` (`training/shapes/sweep.py`) trained variants side by side on one GPU (an
H100, 7 minutes for nine of them) with the shipped stages' own loop, at the step counts this 2-core CPU
reaches in its budget, and scored them like the table below (96 prompts, DDIM 20; guidance 7.5):

| variant (stage 2 + stage 2b steps) | shape | size | position | all right |
|---|---|---|---|---|
| shipped recipe of the previous family (2,609 + 823) | 61.5% | 80.3% | 87.4% | 50.0% |
| this recipe (2,609 + 1,650, noisy share in the first half) | 62.5% | 84.8% | 93.1% | 52.1% |
| 2b with uniform timesteps only | 67.7% | 81.8% | 78.2% | 50.0% |
| pooled prompt added to the time embedding (same steps) | 60.4% | 80.3% | 89.7% | 51.0% |
| cross-attention at 16x16 too (1,680 + 1,065: 1.55x slower per step) | 49.0% | 75.8% | 92.0% | 38.5% |
| two layers per block (1,840 + 1,160: 1.42x slower) | 52.1% | 84.8% | 95.4% | 45.8% |
| 2.3x this CPU budget (6,000 + 2,000) | 74.0% | 77.3% | 100% | 67.7% |
| 2.3x this CPU budget, guidance 1.0 | 81.3% | 97.0% | 86.2% | 70.8% |

Mid-noise timesteps, a 3x text-encoder learning rate, learning rate 6e-4 or EMA 0.995 in stage 2b changed
nothing beyond noise (at guidance 3: all right 56-62%, squares 1-3 of 32). Guidance 3 is the default because
above it the samples overshoot: the sides of squares turn concave and shapes outgrow their size word.

## Where the squares are lost

`python -m training.shapes.probe --sheet docs/images/shapes-squares-probe.png` (`training/shapes/probe.py`)
follows the grid's prompts through each stage an image can pass: the exact render of the grid's scene, the
render encoded and decoded by the VAE, the render edited (img2img, DDIM 20, guidance 3) with its own prompt,
and generation from noise. Per class, of 32 prompts each (fill: mean share of the shape's box it covers; the
scorer calls a square from 0.9):

| stage | squares right | square fill | circles right | circle fill | triangles right |
|---|---|---|---|---|---|
| exact render | 32 | 1.000 | 32 | 0.783 | 32 |
| VAE round trip (posterior mean) | 30 | 0.949 | 32 | 0.814 | 29 |
| edit at strength 0.3 (from t = 300, alpha-bar 0.57) | 13 | 0.887 | 32 | 0.831 | 30 |
| edit at strength 0.5 | 8 | 0.866 | 31 | 0.833 | 29 |
| edit at strength 0.7 | 4 | 0.829 | 31 | 0.843 | 29 |
| generated | 1 | 0.842 | 31 | 0.842 | 29 |

![Square prompts, top to bottom: exact, VAE round trip, edit at 0.3, 0.5 and 0.7, generated]({SQUARES_SHEET})

Generated squares and circles have the same mean fill: the UNet draws one rounded box for both words, and
pulls even an exact square towards it once an edit starts from t = 300. The VAE costs only the smallest
squares their corners. One-off CPU fine-tunes of the shipped stage-2b weights (300 steps each, batch 64,
learning rate 1e-4 with a cosine decay; not part of the training code) did not move squares beyond a plain
fine-tune of the same length, which drew 5 of 32 at guidance 3 (fill 0.849):
- a pixel loss through the frozen decoder on half of each batch (t < 500, weight 2): 3 of 32, fill 0.853;
- squares drawn twice as often: 6 of 32, fill 0.858;
- minimal pairs (each scene beside the same scene with circle and square swapped, same noise and timestep):
  4 of 32, fill 0.849;
- and four times as long, 1,200 plain steps (20 minutes): still 5 of 32 (fill 0.859), though all right rose to
  64.6% and size to 95.5% (the shipped family: 57.3%, 89.4%). It is not shipped: it would take the
  training past its two hours.

Nor did the sampling side: a decoder fine-tuned for 12 minutes on the UNet's one-step predictions as well as
on posterior samples: 3 of 32 (fill 0.850); 60 DDIM steps instead of 20: 1 of 32; guidance rescale 0.7 (Lin et
al. 2023): 3 of 32, and on a second prompt grid all right fell from 62.5% to 58.3%; the DDPM sampler: 6 of 32.
Nor is it the size and position words: stage 2 trained from scratch for 24 minutes (the feasibility run's
time) on the same latents with prompts of shape, colour and background only (1,267 steps; this machine runs
the UNet at 1.14 s a step, where the feasibility facts in the issue report 0.73 s and 1,971 steps) drew 0 of
32 squares and 7 of 32 triangles at guidance 7.5 on those prompts (DDIM 20 on stage 2's schedule). The
feasibility recipe itself (epsilon prediction, min-SNR-5, the same UNet, 24 minutes: 1,271 steps here) drew 1
of 32 squares and 23 of 32 triangles at guidance 7.5, with colour 83% and background 95%; its 99% shape class
does not reproduce on this machine under this scorer. Like the sweep, this points at training compute: the
binding of "circle" and "square" to their outlines is what this budget does not reach.

A faster step did not reach it either. `--precision bf16` runs the UNet stages' forward passes under bf16
autocast (weights, optimiser state and loss stay fp32; on the shipped model's batches the loss moves by 0.1%
and the gradient keeps cosine 0.9997): 0.75 s a step in a quiet benchmark, 0.83-0.89 s in the run, against
1.04-1.07 s in fp32. With the shipped budgets it trained stage 2 for 3,041 steps, stage 2b for 1,919 (1.16x the
shipped 4,259 in all) and inpainting for 1,125 (766), from the same tokenizer, VAE and latents. At guidance 3 it
scored shape 62.5% (squares 4, circles 28, triangles 28 of 32), size 87.9%, position 94.3%, all right 59.4%
(shipped: 63.5%, 89.4%, 97.7%, 57.3%), inpaint PSNR outside the mask 34.1 dB (32.1): the same model within the
noise of the variants above, so the fp32 family stays shipped and fp32 stays the default.

Two more probes of the shipped weights point the same way. A negative prompt that swaps the shape word (so that
guidance amplifies only the difference between "square" and "circle") makes circles rounder as the scale rises
(fill 0.778 at guidance 3, 0.631 at 15; 24 and 10 of 32 still judged circles) but squares no boxier (fill 0.804
and 0.803; 4 and 2 of 32): the UNet has learnt what "circle" adds to the rounded box, not what "square" does.
And a 300-step bf16 fine-tune with half of each batch from t < 300, where the corners are decided, drew 5 of 32
squares, like the plain fine-tune of the same length, and kept 14 of 32 exact squares through an edit at 0.3
(shipped: 13).

## Known problems

{_known_problems(ev, report.get("notes", []))}

## Evaluation

{ev.get("n", 96)} fixed prompts with fixed seeds (cycling shapes; size word on 2/3, position word on 5/6 of
them), DDIM {ev.get("steps", 20)} steps, scored from pixels by `training/shapes/evaluate.py`
(`python -m training.shapes eval --model models/shapes --steps 20 --n 96`). Size and position
accuracy count only prompts that name them. The scorer gets 100% on exact renders
(`python -m training.shapes selfcheck`).

{_eval_table(ev)}

fp32 original of the UNet at guidance {g:g}: background {_pct(ref.get("background"))}, colour {_pct(ref.get("colour"))},
shape {_pct(ref.get("shape"))}, size {_pct(ref.get("size"))}, position {_pct(ref.get("position"))}; mean PSNR between
fp16-stored and fp32 outputs {ev.get("fp16_vs_fp32_psnr_db", 0):.1f} dB.

Scoring rules:

{_scoring()}
"""


def _inpaint_note(inp: dict[str, Any]) -> str:
    psnr = inp.get("psnr_outside_db")
    if not isinstance(psnr, (int, float)):
        return "- Not evaluated yet."
    if psnr >= 30:
        return (
            f"- Outside the mask the raw output stays within {psnr:.1f} dB PSNR of the input (VAE round trip"
            " included); sdserve's `preserve_unmasked` makes it exact."
        )
    return (
        f"- **Known problem**: outside the mask the raw output is only {psnr:.1f} dB PSNR from the input (target 30):"
        " composite the original back outside the mask (sdserve's `preserve_unmasked`)."
    )


def inpainting_card(report: dict[str, Any]) -> str:
    """README.md of the inpainting folder."""
    inp = report.get("eval", {}).get("inpaint", {})
    return f"""---
library_name: diffusers
pipeline_tag: image-to-image
license: apache-2.0
tags: [stable-diffusion, inpainting, tiny, synthetic, sdserve]
---

# shapes-inpainting

The inpainting sibling of `{T2I_NAME}` (see its README for the prompt language, the geometry and
the limits): a 9-channel UNet (latents 4 + mask 1 + masked-image latents 4) initialised from
the text-to-image UNet with zero-initialised extra `conv_in` channels, fine-tuned with the
text encoder frozen. VAE, text encoder and tokenizer are identical to `{T2I_NAME}`'s; the UNet is
stored in fp16.

- Mask: white (255) = repaint. The prompt describes the whole target image, e.g. mask the
  shape and ask for `a blue circle on a white background` to recolour a red circle.
- Trained on random masks: the shape's box plus 1-6 px (55%), everything but that box (15%),
  one or two random boxes (25%), the whole image (5%); the masked image is zeroed under the
  mask and encoded with `latent_dist.sample()`, the mask nearest-downsampled to 16x16, exactly
  as `StableDiffusionInpaintPipeline` does; the targets are posterior means, as for `{T2I_NAME}`.
  {_minutes(report.get("inpaint"))}, on the zero-terminal-SNR schedule, AdamW 5e-4, batch 64, EMA 0.998.
- The pipeline does not paste the original back outside the mask: the model has to reproduce it.
{_inpaint_note(inp)}

## Evaluation

{report.get("eval", {}).get("n", 96)} recolour cases (shape box + 3 px masked, new shape colour asked), DDIM 20
steps, guidance {report.get("eval", {}).get("inpaint_guidance", 7.5):g} (the folder's default), strength 1.0, raw
pipeline output:

| figure | value | target |
|---|---|---|
| shape recoloured as asked | {_pct(inp.get("recolour"))} | 90% |
| shape class kept | {_pct(inp.get("shape_kept"))} | |
| PSNR outside the mask (all pixels pooled) | {inp.get("psnr_outside_db", 0):.1f} dB | 30 dB |
| worst single image | {inp.get("psnr_outside_db_worst", 0):.1f} dB | |
"""


def write_cards(out_root: Path, report: dict[str, Any]) -> None:
    """Write both README.md files."""
    (out_root / T2I_NAME / "README.md").write_text(text_to_image_card(report))
    (out_root / INPAINT_NAME / "README.md").write_text(inpainting_card(report))
