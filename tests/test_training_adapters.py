"""The adapters stage of the shapes training code (issue 23), fast: the extra colours leave the base language and
scorer alone, the grids are what the cards say, and a tiny run of `python -m training.shapes adapters` (two
steps each, two-image grids, into a temporary folder) writes both adapter folders in the promised layouts,
which diffusers loads back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from service.settings import REPO_ROOT
from training.shapes import cli
from training.shapes.adapter_eval import FRESH_SEED, lora_grid, ti_grid
from training.shapes.adapters import LORA_NAME, TI_NAME, WEIGHTS
from training.shapes.data import attributes_with, place, render
from training.shapes.evaluate import EXTENDED_PALETTE, accuracy, judge, prompt_grid, score
from training.shapes.grammar import (
    ADAPTER_COLOURS,
    COLOURS,
    LORA_COLOURS,
    PROMPT_WORDS,
    TI_CANDIDATES,
    TI_COLOUR,
    TI_TOKEN,
    Attributes,
    parse_prompt,
    prompt_text,
)
from training.shapes.refine import MORE_BASE_WEIGHT

MODEL = REPO_ROOT / "models" / "shapes"
MANIFEST_KEYS = {"name", "kind", "layout", "family", "base", "targets", "token", "sha256", "size_bytes", "source"}


def test_base_language_unchanged() -> None:
    assert len(COLOURS) == 8 and not set(ADAPTER_COLOURS) & set(COLOURS)
    assert all(parse_prompt(f"a {c} circle on a red background") is None for c in ADAPTER_COLOURS)
    assert f"<{TI_COLOUR}>" == TI_TOKEN and TI_COLOUR in TI_CANDIDATES and TI_COLOUR not in LORA_COLOURS
    assert set(ADAPTER_COLOURS) == {TI_COLOUR, *LORA_COLOURS} and len(LORA_COLOURS) == 2
    assert ("shapes-" + "-".join(LORA_COLOURS), f"shapes-{TI_COLOUR}") == (LORA_NAME, TI_NAME)
    text = prompt_text(Attributes("circle", TI_COLOUR, "red"), PROMPT_WORDS)
    assert text == f"a {TI_TOKEN} circle on a red background"
    assert prompt_text(Attributes("circle", "red", "blue")) == "a red circle on a blue background"


def test_extended_palette_is_opt_in() -> None:
    c1, c2 = LORA_COLOURS
    image = render(place(Attributes("square", c1, c2, "large"), random.Random(0)))
    assert judge(image).colour in COLOURS  # the base scorer knows only its 8 colours
    j = judge(image, EXTENDED_PALETTE)
    assert (j.colour, j.background, j.shape) == (c1, c2, "square")


def test_adapter_grids_judge_right_on_exact_renders() -> None:
    grids = lora_grid(24) + ti_grid(24)
    assert {g.seed for g in grids}.isdisjoint(g.seed for g in prompt_grid(96, 0))
    assert all(set(LORA_COLOURS) & {g.attrs.colour, g.attrs.background} for g in lora_grid(24))
    assert all(TI_COLOUR in (g.attrs.colour, g.attrs.background) for g in ti_grid(24))
    images = [render(place(g.attrs, random.Random(g.seed))) for g in grids]
    acc = accuracy(score(judge(im, EXTENDED_PALETTE), g.attrs) for im, g in zip(images, grids, strict=True))
    assert min(acc.values()) == 1.0


def test_attributes_with_puts_a_new_colour_in_one_slot() -> None:
    rng = random.Random(1)
    new = set(LORA_COLOURS)
    drawn = [attributes_with(rng, sorted(new), [*COLOURS, *new]) for _ in range(200)]
    assert all(new & {a.colour, a.background} and a.colour != a.background for a in drawn)
    assert {a.colour for a in drawn} & new and {a.background for a in drawn} & new


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("adapters")
    args = ["adapters", "--out", str(tmp), "--work", str(tmp / "work"), "--log-dir", str(tmp / "logs")]
    args += ["--model", str(MODEL), "--lora-steps", "2", "--ti-steps", "2", "--adapter-batch", "2"]
    args += ["--ti-compare-steps", "2", "--refine-steps", "1", "--ti-refine-steps", "1"]
    args += ["--refine-more-rounds", "2", "--refine-more-steps", "1", "--invert-more-steps", "3"]
    args += ["--adapter-scenes", "4", "--n", "2", "--steps", "2"]
    assert cli.main(args) == 0
    return tmp / "adapters"


def _manifest(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "adapter.json").read_text())
    assert set(data) == MANIFEST_KEYS
    assert data["size_bytes"] == (folder / WEIGHTS).stat().st_size
    assert data["source"] == "trained: python -m training.shapes adapters"
    assert (folder / "README.md").read_text().count("license: apache-2.0") == 1
    return data


def test_tiny_run_writes_a_diffusers_lora(tiny_run: Path) -> None:
    folder = tiny_run / LORA_NAME
    data = _manifest(folder)
    assert (data["kind"], data["layout"], data["family"], data["token"]) == ("lora", "diffusers", "sd15", "")
    assert data["base"] == "cross_attention_dim=64,text_width=64"
    assert data["targets"] == ["text_encoder", "unet"]
    assert (folder / WEIGHTS).stat().st_size < 5_000_000
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)
    report = json.loads((tiny_run.parent / "work" / "adapters-report.json").read_text())
    ev = report["lora_eval"]
    assert ev["scale_0_identical"] and ev["disabled_identical"] and ev["lora_changes_images"]
    assert set(report["ti_candidates"]) == set(TI_CANDIDATES) and report["ti_eval"]["token"] == TI_TOKEN
    # the fresh grids (2n prompts) beside the tuning ones
    assert ev["fresh"]["n"] == 4 and report["ti_eval"]["fresh"]["seed"] == FRESH_SEED
    # the first refining round, then the later ones (base images weighed more), each in the figures and the card
    stage = report["lora"]
    assert [stage[k] for k in ("refine_steps", "refine_more_1_steps", "refine_more_2_steps")] == [1, 1, 1]
    card = " ".join((folder / "README.md").read_text().split())
    assert (
        "Then 2 more rounds of 1/1 steps (a fresh cosine schedule, prompts and noise), the base-language images"
        f" weighed {MORE_BASE_WEIGHT:g}" in card
    )
    # the targets' check (checked_inversion): how many of the rendered new-colour scenes were kept, in the card
    assert stage["scenes_rendered"] == 4 and 0 < stage["scenes"] <= 4 and stage["invert_more_steps"] == 3
    assert f"get 3 more steps, and those still wrong are left out ({stage['scenes']} of 4 kept)" in card


def test_tiny_run_writes_a_diffusers_embedding(tiny_run: Path) -> None:
    folder = tiny_run / TI_NAME
    data = _manifest(folder)
    assert (data["kind"], data["layout"], data["token"], data["base"]) == (
        "textual_inversion",
        "diffusers",
        TI_TOKEN,
        "text_width=64",
    )
    assert data["targets"] == ["text_encoder"]
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        assert list(f.keys()) == [TI_TOKEN]
        vectors = f.get_tensor(TI_TOKEN)
    assert vectors.dtype == torch.float32 and vectors.shape == (1, 64)


def test_decoder_inversion_draws_the_colours_the_encoder_loses() -> None:
    """The shipped VAE's encoder maps a flat teal field to green and a flat cream one near white; the latents
    invert_decoder finds from those encodings decode to the fields' own colours (what the LoRA trains on)."""
    from diffusers import AutoencoderKL

    from training.shapes.adapters import INVERT_LR, INVERT_STEPS
    from training.shapes.tensors import encode_moments, invert_decoder, to_images, to_tensor

    vae = AutoencoderKL.from_pretrained(str(MODEL / "vae"), torch_dtype=torch.float32).eval()
    names = ["teal", "cream"]
    fields = np.stack([np.full((64, 64, 3), ADAPTER_COLOURS[c], np.uint8) for c in names])
    x = to_tensor(fields)
    mean, _ = encode_moments(vae, x)
    refined = invert_decoder(vae, x, mean, INVERT_STEPS, INVERT_LR)
    with torch.no_grad():
        before, after = to_images(vae.decode(mean).sample), to_images(vae.decode(refined).sample)
    assert [judge(im, EXTENDED_PALETTE).background for im in before] != names  # the encoder alone loses them
    assert [judge(im, EXTENDED_PALETTE).background for im in after] == names
    assert torch.equal(mean, encode_moments(vae, x)[0])  # the starting point is not modified in place


def test_checked_inversion_keeps_only_scenes_that_decode_as_their_prompt() -> None:
    """Teal shapes on cream, inverted from a wrong start (the same scenes' latents in green on yellow): a few steps
    leave them decoding as the start's colours; checked_inversion inverts those further, and leaves out whatever
    still decodes as something else (here a scene labelled with the wrong colour), so every kept latent decodes as
    its prompt. (Through the stage-1 decoder the shipped INVERT_STEPS from the plain encodings left some teal-on-cream
    scenes with a yellow ring; the palette decoder draws those right, so the wrong start stands in for them.)"""
    from dataclasses import replace

    from training.shapes.adapters import (
        INVERT_LR,
        INVERT_STEPS,
        checked_inversion,
        decodes_as,
        load_base,
        render_scenes,
    )
    from training.shapes.tensors import encode_moments, invert_decoder, to_tensor

    base = load_base(MODEL)
    scenes = [place(Attributes("circle", "teal", "cream", "small"), random.Random(f"checked:{i}")) for i in range(6)]
    attrs = [s.attrs for s in scenes]
    attrs[0] = replace(attrs[0], colour="red")  # a label the render does not show
    x = to_tensor(np.stack([np.asarray(render(s)) for s in scenes]))
    others = [replace(s, attrs=replace(s.attrs, colour="green", background="yellow")) for s in scenes]
    start, _ = encode_moments(base.vae, to_tensor(np.stack([np.asarray(render(s)) for s in others])))
    steps = 5
    plain = decodes_as(base.vae, invert_decoder(base.vae, x, start, steps, INVERT_LR), attrs)
    assert not all(plain[1:])  # the case the check is for: plain inversion leaves some of them wrong
    refined, kept = checked_inversion(base.vae, x, start, attrs, steps, 80)
    assert 0 not in kept and sum(plain) < len(kept)
    assert all(decodes_as(base.vae, refined[kept], [attrs[i] for i in kept]))
    before = start.clone()
    checked_inversion(base.vae, x, start, attrs, steps, 1)
    assert torch.equal(start, before)  # the starting point is not modified in place

    def draw(rng: random.Random) -> Attributes:
        return Attributes("circle", "teal", "cream", "small")

    data = render_scenes(base, draw, "checked", 6, invert=INVERT_STEPS, invert_more=80)
    assert 0 < len(data.ids) == len(data.mean) == len(data.std) <= 6
