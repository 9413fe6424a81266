"""The LoRA's refining phase (training/shapes/refine.py): the sampler it backpropagates through is the pipeline's,
the recoloured targets keep the base model's layout, and the colour term does not reward a bigger shape."""

from __future__ import annotations

import random

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from service.settings import REPO_ROOT
from training.shapes.adapters import colour_embedding_mean, load_base, with_embedding
from training.shapes.data import place, render
from training.shapes.evaluate import EXTENDED_PALETTE, judge
from training.shapes.grammar import ALL_COLOURS, COLOURS, NEW_COLOURS, TI_COLOUR, TI_TOKEN, Attributes
from training.shapes.refine import PROXIES, SAMPLE_STEPS, colour_loss, proxied, recolour, refine_ti, rgb, sample
from training.shapes.sample_eval import load_pipeline
from training.shapes.tensors import to_tensor
from training.shapes.text import token_ids

MODEL = REPO_ROOT / "models" / "shapes"


def _image(attrs: Attributes, seed: int = 0) -> torch.Tensor:
    return to_tensor(np.array(render(place(attrs, random.Random(seed))))[None])[0]


def test_the_differentiable_sampler_is_the_pipelines() -> None:
    """refine.sample draws what StableDiffusionPipeline draws from the same generator (so the phase trains the
    images the server returns), and gradients reach the text encoder through every step."""
    pipe = load_pipeline(StableDiffusionPipeline, MODEL)
    prompts = ["a small red circle on a blue background", "a large yellow square on a black background"]
    expected = pipe(
        prompt=prompts,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=2.0,
        output_type="pt",
    ).images
    base = load_base(MODEL)
    scheduler = DDIMScheduler.from_pretrained(str(MODEL / "scheduler"))
    scheduler.set_timesteps(SAMPLE_STEPS)
    ids = token_ids(base.tokenizer, prompts)
    empty = token_ids(base.tokenizer, [""])[0]
    scale = float(base.vae.config.scaling_factor)
    weight = base.text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    images = sample(
        base.unet,
        base.text_encoder,
        lambda z: base.vae.decode(z / scale).sample,
        scheduler,
        ids,
        empty,
        torch.Generator().manual_seed(3),
        2.0,
    )
    got = (images / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(got.detach(), expected, atol=1e-4), float((got.detach() - expected).abs().max())
    images.mean().backward()  # type: ignore[no-untyped-call]
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0


def test_a_recoloured_stand_in_is_the_new_colours_scene() -> None:
    """The target of a new-colour prompt: the stand-in scene with the stand-in colour swapped is, pixel for pixel
    (up to rounding), the render of the new-colour scene, and the judge names the new colour in it. Every pair of
    a new colour and a base colour, in either slot."""
    pairs = [(c, b) for c in ALL_COLOURS for b in ALL_COLOURS if c != b and len(NEW_COLOURS.keys() & {c, b}) == 1]
    for i, (colour, background) in enumerate(pairs):
        shape, size = ("circle", "triangle", "square")[i % 3], ("large", "small")[i % 2]
        wanted = Attributes(shape, colour, background, size, None)
        stand_in = proxied(wanted)
        assert {stand_in.colour, stand_in.background} <= set(COLOURS)
        assert stand_in.colour != stand_in.background
        target = recolour(_image(stand_in)[None], [stand_in], [wanted])[0]
        assert float((target - _image(wanted)).abs().max()) < 2.5 / 127.5
        image = ((target.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        judged = judge(Image.fromarray(image), EXTENDED_PALETTE)
        assert (judged.colour, judged.background, judged.shape) == (wanted.colour, wanted.background, wanted.shape)


def test_a_prompt_with_two_new_colours_keeps_its_background_word() -> None:
    """Both slots new (the LoRA's teal on cream): only the shape's colour is stood in for; replacing both measured
    worse (refine.proxied's docstring)."""
    for colour, background in (("teal", "cream"), ("cream", "teal")):
        stand_in = proxied(Attributes("circle", colour, background, None, None))
        assert stand_in.colour in COLOURS and stand_in.background == background


def test_stand_ins_avoid_the_other_slot() -> None:
    for new, stand_ins in PROXIES.items():
        for other in stand_ins:
            assert proxied(Attributes("square", new, other, None, None)).colour != other
            assert proxied(Attributes("square", other, new, None, None)).background != other


def test_the_colour_term_does_not_reward_a_bigger_shape() -> None:
    """A right-coloured shape scores (near) zero at any size, so the term cannot pull shapes larger (an earlier
    version without the erosion did: base prompts' sizes came out 38 points worse); a wrong colour scores more."""
    right = [Attributes("square", "teal", "yellow", size, None) for size in ("small", "large")]
    losses = [float(colour_loss(_image(a)[None], [a])) for a in right]
    assert max(losses) < 0.01, losses
    wrong = Attributes("square", "green", "yellow", "large", None)
    assert float(colour_loss(_image(wrong)[None], [right[1]])) > 0.2
    border = torch.zeros(3, 64, 64) + rgb("teal")
    assert float(colour_loss(border[None], [Attributes("circle", "red", "white", None, None)])) > 1.0


def test_refining_the_embedding_trains_the_vector_and_nothing_else() -> None:
    """refine_ti's gradients reach the embedding through the sampler: it moves, the same seed gives the same
    vector, and the model it loads keeps no trace (a fresh load has no placeholder token)."""
    base = load_base(MODEL)
    start = colour_embedding_mean(base)[None]
    first, figures = refine_ti(MODEL, start, TI_COLOUR, 2, 1, 2.0, seed=0)
    again, _ = refine_ti(MODEL, start, TI_COLOUR, 2, 1, 2.0, seed=0)
    assert first.shape == start.shape and figures["refine_steps"] == 2
    assert float((first - start).abs().max()) > 1e-4 and torch.equal(first, again)
    assert TI_TOKEN not in load_base(MODEL).tokenizer.get_vocab()


def test_the_embedding_hook_reads_the_live_vector_and_goes_away() -> None:
    """with_embedding: inside, the token's position reads the given vector (and its gradient flows back);
    outside, the text encoder is its plain self for every prompt."""
    base = load_base(MODEL)
    plain = token_ids(base.tokenizer, ["a red circle on a blue background"])
    before = base.text_encoder(plain)[0].detach()
    vector = torch.nn.Parameter(torch.randn(1, 64))
    with with_embedding(base, [TI_TOKEN], vector) as (placeholder,):
        ids = token_ids(base.tokenizer, [f"a {TI_TOKEN} circle on a blue background"])
        assert placeholder in ids[0].tolist()
        base.text_encoder(ids)[0].sum().backward()
        assert vector.grad is not None and float(vector.grad.abs().sum()) > 0
        assert torch.equal(base.text_encoder(plain)[0], before)
    row = base.text_encoder.get_input_embeddings()(torch.tensor([placeholder]))
    assert not torch.allclose(row, vector.detach())
