"""A1111-style weighted, chunked prompt encoding (sdserve_core.weighted) and the families' two prompt paths: chunk
boundaries computed by hand, weights against a straightforward reference, plain prompts exactly as before,
textual-inversion embeddings through a hook that leaves nothing behind, long prompts through the pipelines."""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from sdserve_core import families, weighted
from sdserve_core.components import Components, load_components
from sdserve_core.families import sd15
from sdserve_core.pipeline.call import PipelineCall
from sdserve_core.pipeline.run import run
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from sdserve_core.tasks import Task
from sdserve_core.weighted import Chunk, Encoder, TokenEmbedding, chunks_of
from service.tiny_sdxl import build_tiny_sdxl
from tests.harness import TINY

BOS, EOS, PAD, COMMA = 1, 2, 3, 5
DOWN = 1 / 1.1


class WordTokenizer:
    """One token per word `tN` (id N + 10) or comma, so chunk boundaries can be counted by hand."""

    model_max_length = 77
    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __call__(self, text: str, **kwargs: Any) -> Any:
        assert kwargs.get("add_special_tokens") is False
        return SimpleNamespace(input_ids=[COMMA if w == "," else int(w[1:]) + 10 for w in re.findall(r"t\d+|,", text)])


WORDS = Encoder("text_encoder", None, WordTokenizer())


def words(start: int, stop: int) -> str:
    return " ".join(f"t{i}" for i in range(start, stop))


def ids(start: int, stop: int) -> list[int]:
    return [i + 10 for i in range(start, stop)]


def body(chunk: Chunk) -> list[int]:
    """The prompt's ids in a finished chunk (between BOS and the first EOS)."""
    assert len(chunk.ids) == 77 and len(chunk.weights) == 77 and chunk.ids[0] == BOS
    return chunk.ids[1 : chunk.ids.index(EOS)]


def bodies(text: str, vocab: dict[str, TokenEmbedding] | None = None) -> list[list[int]]:
    return [body(c) for c in chunks_of(WORDS, text, vocab)]


# -- chunking, by hand ------------------------------------------------------------------------------------------


def test_a_chunk_is_bos_tokens_eos_then_padding() -> None:
    (chunk,) = chunks_of(WORDS, "t1 t2")
    assert chunk.ids == [BOS, 11, 12, EOS] + [PAD] * 73
    assert chunk.weights == [1.0] * 77


def test_75_tokens_fill_one_chunk_and_76_need_two() -> None:
    (full,) = chunks_of(WORDS, words(0, 75))
    assert full.ids == [BOS, *ids(0, 75), EOS]
    assert bodies(words(0, 76)) == [ids(0, 75), ids(75, 76)]
    assert bodies(words(0, 160)) == [ids(0, 75), ids(75, 150), ids(150, 160)]


def test_an_empty_prompt_is_one_empty_chunk() -> None:
    assert bodies("") == [[]]
    assert weighted.empty_chunk(WORDS).ids == chunks_of(WORDS, "")[0].ids


@pytest.mark.parametrize(
    ("comma_at", "first"),
    [
        (60, 61),  # 75 - 60 = 15 <= 20: the chunk ends after the comma
        (55, 56),  # exactly 20 back: still
        (54, 75),  # 21 back: too far, the chunk is filled
        (50, 75),
    ],
)
def test_a_full_chunk_breaks_after_a_comma_among_its_last_20_tokens(comma_at: int, first: int) -> None:
    text = words(0, comma_at) + " , " + words(comma_at, 100)
    tokens = [*ids(0, comma_at), COMMA, *ids(comma_at, 100)]
    assert bodies(text) == [tokens[:first], tokens[first:]]


def test_a_comma_arriving_at_a_full_chunk_starts_the_next() -> None:
    # A1111's order: the comma is noted, then the full chunk is closed, which forgets it.
    assert bodies(words(0, 75) + " , " + words(75, 80)) == [ids(0, 75), [COMMA, *ids(75, 80)]]


def test_break_starts_a_new_chunk() -> None:
    assert bodies("t1 t2 BREAK t3") == [[11, 12], [13]]
    assert bodies("t1 BREAK t2 BREAK t3") == [[11], [12], [13]]
    assert bodies("BREAK t1") == [[], [11]]
    assert bodies("t1 BREAK") == [[11]]
    assert bodies(words(0, 80) + " BREAK t1") == [ids(0, 75), ids(75, 80), [11]]


def test_weights_follow_their_tokens_and_the_specials_weigh_one() -> None:
    (chunk,) = chunks_of(WORDS, "t1 (t2 t3:1.5) [t4], t5")
    assert body(chunk) == [11, 12, 13, 14, COMMA, 15]
    assert chunk.weights[:8] == [1.0, 1.0, 1.5, 1.5, DOWN, 1.0, 1.0, 1.0]
    assert chunk.weights[8:] == [1.0] * 69


def test_weights_move_with_a_comma_backtrack() -> None:
    first, second = chunks_of(WORDS, words(0, 60) + ", (" + words(60, 80) + ":1.3)")
    assert first.weights[1:62] == [1.0] * 61
    assert second.weights[1:21] == [1.3] * 20 and second.weights[21:] == [1.0] * 56


def test_embedding_positions_in_chunks() -> None:
    vectors = torch.arange(12.0).view(3, 4)
    vocab = {"emb": TokenEmbedding({"text_encoder": vectors})}
    (chunk,) = chunks_of(WORDS, "t1 (emb:1.2) t2", vocab)
    assert body(chunk) == [11, 0, 0, 0, 12]
    assert chunk.weights[:6] == [1.0, 1.0, 1.2, 1.2, 1.2, 1.0]
    assert [(offset, v.tolist()) for offset, v in chunk.fixes] == [(2, vectors.tolist())]
    # Only whole words: inside another word it is text.
    assert bodies("embx t1", vocab) == [[11]]
    # An embedding is never split: 73 tokens and 3 vectors make two chunks.
    first, second = chunks_of(WORDS, words(0, 73) + " emb", vocab)
    assert body(first) == ids(0, 73) and body(second) == [0, 0, 0] and second.fixes[0][0] == 1
    # A comma backtrack takes the embeddings after the comma along (A1111 leaves them behind).
    first, second = chunks_of(WORDS, words(0, 60) + " , " + words(60, 70) + " emb " + words(70, 75), vocab)
    assert len(body(first)) == 61 and not first.fixes
    assert body(second) == [*ids(60, 70), 0, 0, 0, *ids(70, 75)] and second.fixes[0][0] == 11


def test_an_embedding_needs_vectors_for_the_encoder() -> None:
    vocab = {"emb": TokenEmbedding({"text_encoder_2": torch.zeros(1, 4)})}
    with pytest.raises(ValueError, match="'emb' has no vectors for text_encoder"):
        chunks_of(WORDS, "t1 emb", vocab)


# -- the tiny models ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(models_dir: Path) -> Components:
    return load_components(models_dir / TINY, "fp32", torch.float32, "cpu")


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("weighted") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def xl(xl_folder: Path) -> Components:
    return load_components(xl_folder, "fp32", torch.float32, "cpu")


def encode(components: Components, prompt: str, negative: str = "", **kwargs: Any) -> PromptEmbeds:
    vocab = kwargs.pop("vocab", None)
    inputs = PromptInputs(prompt, negative, **kwargs)
    return families.get(components.family).encode_prompt(components, inputs, True, "cpu", vocab=vocab)


def assert_same(a: PromptEmbeds, b: PromptEmbeds) -> None:
    assert len(a.tensors()) == len(b.tensors())
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def text_parts(components: Components, which: int = 1) -> tuple[Any, Any]:
    """The tokenizer and text encoder (the second with `which` 2), untyped."""
    if which == 2:
        return components.tokenizer_2, components.text_encoder_2
    return components.tokenizer, components.text_encoder


def reference_chunk(tokenizer: Any, parts: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's ids [1, 77] and weights [1, 77, 1], written out directly."""
    tokens: list[int] = []
    weights: list[float] = []
    for text, weight in parts:
        found = token_ids(tokenizer, text)
        tokens += found
        weights += [weight] * len(found)
    pad = 77 - 2 - len(tokens)
    chunk = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad]
    return torch.tensor([chunk]), torch.tensor([1.0, *weights, *[1.0] * (pad + 1)]).view(1, -1, 1)


def emphasised(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A1111's formula, with sdserve's one exception: a chunk whose mean is ~0 (the tiny test encoders' last
    LayerNorm has no bias) is not rescaled (sdserve_core.weighted.emphasis)."""
    scaled = z * w
    if scaled.mean().abs() <= 1e-3 * z.abs().mean():
        return scaled
    return scaled * (z.mean() / scaled.mean())


def test_emphasis_rescales_to_the_original_mean_as_a1111_does() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 77, 8, generator=gen) * 0.5 + 0.3  # a real CLIP tower's hidden states have a non-zero mean
    weights = [1.0, 1.5, 1.5, 0.9, *[1.0] * 73]
    w = torch.tensor(weights).view(1, -1, 1)
    expected = (z * w) * (z.mean() / (z * w).mean())
    torch.testing.assert_close(weighted.emphasis(z, weights), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weight", [1.2, 1.5, 0.5])
def test_emphasis_on_a_zero_mean_chunk_stays_finite_and_unrescaled(weight: float) -> None:
    """Dividing by a mean of ~1e-9 turned `(masterpiece:1.2)` into NaN (a black image) on the tiny models."""
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(1))
    z = z - z.mean(dim=-1, keepdim=True)  # what a LayerNorm without bias gives
    weights = [1.0, weight, weight, *[1.0] * 74]
    found = weighted.emphasis(z, weights)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, z * torch.tensor(weights).view(1, -1, 1), rtol=0, atol=0)


# Plain prompts, fitting one chunk: diffusers' encode_prompt exactly as before.
PLAIN = [("a red circle", ""), ("a blue square on a green field", "blurry, low quality"), ("", "")]


@pytest.mark.parametrize(("prompt", "negative"), PLAIN)
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_plain_sd_prompts_are_encoded_exactly_as_before(
    sd: Components, prompt: str, negative: str, clip_skip: int
) -> None:
    pipe = diffusers.StableDiffusionPipeline(**sd15._modules(sd), scheduler=None)
    with torch.inference_mode():
        skipped = sd15.skip_layers(sd, prompt, clip_skip, "cpu") if clip_skip else None
        before = pipe.encode_prompt(None if clip_skip else prompt, "cpu", 1, True, negative, prompt_embeds=skipped)
    assert_same(encode(sd, prompt, negative, clip_skip=clip_skip), PromptEmbeds(*before))


def xl_pipe(xl: Components) -> Any:
    modules = {k: getattr(xl, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    return diffusers.StableDiffusionXLPipeline(**modules, scheduler=None, add_watermarker=False)


@pytest.mark.parametrize(("prompt", "negative"), PLAIN)
@pytest.mark.parametrize("clip_skip", [0, 2])
def test_plain_sdxl_prompts_are_encoded_exactly_as_before(
    xl: Components, prompt: str, negative: str, clip_skip: int
) -> None:
    with torch.inference_mode():
        before = xl_pipe(xl).encode_prompt(
            prompt, negative_prompt=negative or None, device="cpu", clip_skip=clip_skip or None
        )
    assert_same(encode(xl, prompt, negative, clip_skip=clip_skip), PromptEmbeds(*before))


@pytest.mark.parametrize("clip_skip", [0, 1])
def test_unit_weights_on_the_weighted_path_equal_the_plain_path(sd: Components, xl: Components, clip_skip: int) -> None:
    for components in (sd, xl):
        plain = encode(components, "a red circle", "blurry", clip_skip=clip_skip)
        assert_same(encode(components, "(a red circle:1)", "blurry", clip_skip=clip_skip), plain)
        assert_same(encode(components, "a red circle", "(blurry:1) BREAK", clip_skip=clip_skip), plain)
        # An empty negative prompt is zeroed on SDXL (force_zeros_for_empty_prompt) on either path.
        assert_same(
            encode(components, "a (red:1) circle", clip_skip=clip_skip),
            encode(components, "a red circle", clip_skip=clip_skip),
        )


def test_chunk_ids_equal_the_tokenizers_own_padding(sd: Components) -> None:
    """Also where padding is not EOS (SDXL's second tokenizer pads with "!")."""
    tokenizer: Any = copy.deepcopy(sd.tokenizer)
    tokenizer.pad_token = "!"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in ("a red circle", "", "x" * 75):
        (chunk,) = chunks_of(Encoder("text_encoder", None, tokenizer), text)
        expected = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert chunk.ids == expected


def test_sd_weights_equal_a_reference(sd: Components) -> None:
    tok, te = text_parts(sd)
    found = encode(sd, "a (red:1.5) [circle], sky", "(blurry:0.8)")
    with torch.inference_mode():
        ids, w = reference_chunk(tok, [("a ", 1.0), ("red", 1.5), ("circle", DOWN), (", sky", 1.0)])
        positive = emphasised(te(ids)[0], w)
        ids, w = reference_chunk(tok, [("blurry", 0.8)])
        negative = emphasised(te(ids)[0], w)
    torch.testing.assert_close(found.positive, positive, rtol=0, atol=1e-6)
    assert found.negative is not None
    torch.testing.assert_close(found.negative, negative, rtol=0, atol=1e-6)


def test_sd_clip_skip_with_weights_and_chunks_equals_a_reference(sd: Components) -> None:
    tok, te = text_parts(sd)
    found = encode(sd, "(red:1.3) BREAK [circle]", clip_skip=1)
    assert found.positive.shape == (1, 154, 32) and found.negative is not None and found.negative.shape == (1, 154, 32)
    with torch.inference_mode():
        parts = []
        for piece, weight in (("red", 1.3), ("circle", DOWN)):
            ids, w = reference_chunk(tok, [(piece, weight)])
            parts.append(emphasised(te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2]), w))
        empty, _ = reference_chunk(tok, [])
        negative = torch.cat([te(empty)[0]] * 2, dim=1)  # the negative prompt: last layer, padded to two chunks
    torch.testing.assert_close(found.positive, torch.cat(parts, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(found.negative, negative, rtol=0, atol=1e-6)


def test_sdxl_weights_clip_skip_and_chunks_equal_a_reference(xl: Components) -> None:
    found = encode(xl, "(red:1.4) circle BREAK sky", "bad", clip_skip=1, prompt_2="[square]")
    assert found.positive.shape == (1, 154, 64) and found.pooled is not None and found.pooled.shape == (1, 32)
    with torch.inference_mode():
        ones: list[tuple[str, float]] = []
        first = [
            [[("red", 1.4), (" circle", 1.0)], [("sky", 1.0)]],  # text_encoder: the prompt
            [[("square", DOWN)], ones],  # text_encoder_2: prompt_2, padded with an empty chunk
        ]
        columns, pooled = [], None
        for (tokenizer, encoder), chunks in zip((text_parts(xl), text_parts(xl, 2)), first, strict=True):
            rows = []
            for i, parts in enumerate(chunks):
                ids, w = reference_chunk(tokenizer, parts)
                out = encoder(ids, output_hidden_states=True)
                rows.append(emphasised(out.hidden_states[-3], w))
                pooled = out[0] if i == 0 and out[0].ndim == 2 else pooled
            columns.append(torch.cat(rows, dim=1))
    torch.testing.assert_close(found.positive, torch.cat(columns, dim=-1), rtol=0, atol=1e-6)
    assert pooled is not None
    torch.testing.assert_close(found.pooled, pooled, rtol=0, atol=0)
    assert found.negative is not None and found.negative.shape == (1, 154, 64)


def test_an_sdxl_refiner_encodes_the_prompt_with_its_one_encoder(xl: Components) -> None:
    refiner = Components(
        "sdxl", xl.unet, xl.vae, None, None, xl.text_encoder_2, xl.tokenizer_2, {"requires_aesthetics_score": True}
    )
    found = encode(refiner, "a (red:1.2) circle", "blurry")
    with torch.inference_mode():
        tok, te = xl.tokenizer_2, xl.text_encoder_2
        assert te is not None
        ids, w = reference_chunk(tok, [("a ", 1.0), ("red", 1.2), (" circle", 1.0)])
        expected = emphasised(te(ids, output_hidden_states=True).hidden_states[-2], w)
    torch.testing.assert_close(found.positive, expected, rtol=0, atol=1e-6)
    assert found.positive.shape == (1, 77, 32)


def long_prompt() -> str:
    return ", ".join(f"shape{i} color{i}" for i in range(12))  # well over 2 x 75 of the tiny byte-level tokens


def test_long_prompts_have_as_many_chunks_as_they_need(sd: Components, xl: Components) -> None:
    assert len(chunks_of(Encoder("text_encoder", None, sd.tokenizer), long_prompt())) == 3
    for components, dim in ((sd, 32), (xl, 64)):
        found = encode(components, long_prompt(), "blurry", clip_skip=1)
        assert found.positive.shape == (1, 3 * 77, dim) and found.seq_len == 231
        assert found.negative is not None and found.negative.shape == (1, 3 * 77, dim)
        # The negative prompt's padding chunks are empty chunks.
        pair = Encoder("text_encoder", components.text_encoder, components.tokenizer, *_negative_layer(components))
        with torch.inference_mode():
            empty = weighted.encode_chunk(pair, weighted.empty_chunk(pair), "cpu")[0]
        torch.testing.assert_close(found.negative[:, 154:, : empty.shape[-1]], empty, rtol=0, atol=0)


def _negative_layer(components: Components) -> tuple[int | None]:
    return (None,) if components.family == "sd15" else (-2,)


def test_a_long_prompt_runs_through_the_pipelines(
    sd: Components, xl: Components, xl_folder: Path, models_dir: Path
) -> None:
    for components, folder, size in ((sd, models_dir / TINY, 32), (xl, xl_folder, 64)):
        embeds = encode(components, long_prompt(), "(blurry:1.2)")
        assert embeds.seq_len == 231
        scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
        call = PipelineCall(
            task=Task.GENERATE,
            steps=2,
            width=size,
            height=size,
            generators=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            guidance_scale=5.0,
            embeds=embeds,
        )
        images = run(components, call, scheduler)
        assert np.asarray(images).shape == (1, size, size, 3) and np.isfinite(np.asarray(images)).all()


def test_embeds_of_different_lengths_do_not_share_a_call(sd: Components) -> None:
    short, long = encode(sd, "a"), encode(sd, "a BREAK b")
    assert (short.seq_len, long.seq_len) == (77, 154)
    assert PromptEmbeds.cat([long, long]).seq_len == 154
    with pytest.raises(ValueError, match="different lengths"):
        PromptEmbeds.cat([short, long])


# -- textual inversion ---------------------------------------------------------------------------------------


def with_added_rows(encoder: Any, tokenizer: Any, vectors: torch.Tensor) -> tuple[Any, list[int]]:
    """A copy of `encoder` whose token table has `vectors` appended (the usual way to load an embedding), and the
    new ids."""
    copied = copy.deepcopy(encoder)
    table = copied.get_input_embeddings()
    first = table.num_embeddings
    grown = torch.nn.Embedding(first + vectors.shape[0], table.embedding_dim)
    with torch.no_grad():
        grown.weight[:first] = table.weight
        grown.weight[first:] = vectors
    copied.set_input_embeddings(grown)
    return copied, list(range(first, first + vectors.shape[0]))


@pytest.fixture()
def vectors() -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    yield {
        "text_encoder": torch.randn(2, 32, generator=generator),
        "text_encoder_2": torch.randn(3, 32, generator=generator),
    }


def test_sd_embedding_equals_added_token_rows(sd: Components, vectors: dict[str, torch.Tensor]) -> None:
    tok, te = text_parts(sd)
    vocab = {"<my-style>": TokenEmbedding({"text_encoder": vectors["text_encoder"]})}
    found = encode(sd, "a (<my-style>:1.2) circle", vocab=vocab)
    grown, new_ids = with_added_rows(te, tok, vectors["text_encoder"])
    with torch.inference_mode():
        a, circle = token_ids(tok, "a "), token_ids(tok, " circle")
        tokens = [tok.bos_token_id, *a, *new_ids, *circle, tok.eos_token_id]
        tokens += [tok.pad_token_id] * (77 - len(tokens))
        w = torch.tensor([1.0] * (1 + len(a)) + [1.2] * 2 + [1.0] * (76 - len(a) - 2)).view(1, -1, 1)
        expected = emphasised(grown(torch.tensor([tokens]))[0], w)
    torch.testing.assert_close(found.positive, expected, rtol=0, atol=1e-6)


def test_sdxl_embedding_uses_each_encoders_vectors(xl: Components, vectors: dict[str, torch.Tensor]) -> None:
    vocab = {"emb": TokenEmbedding(vectors)}
    found = encode(xl, "a emb circle", "emb", vocab=vocab)
    columns, pooled = [], None
    with torch.inference_mode():
        for name, (tokenizer, encoder) in (("text_encoder", text_parts(xl)), ("text_encoder_2", text_parts(xl, 2))):
            grown, new_ids = with_added_rows(encoder, tokenizer, vectors[name])
            tokens = [tokenizer.bos_token_id, *token_ids(tokenizer, "a "), *new_ids, *token_ids(tokenizer, " circle")]
            tokens += [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (76 - len(tokens))
            out = grown(torch.tensor([tokens]), output_hidden_states=True)
            columns.append(out.hidden_states[-2])
            pooled = out[0] if out[0].ndim == 2 else pooled
    torch.testing.assert_close(found.positive, torch.cat(columns, dim=-1), rtol=0, atol=1e-6)
    assert pooled is not None and found.pooled is not None
    torch.testing.assert_close(found.pooled, pooled, rtol=0, atol=1e-6)
    other = encode(xl, "a", "x").negative
    assert found.negative is not None and other is not None and not torch.equal(found.negative, other)


def test_the_hook_leaves_the_encoders_as_they_were(
    sd: Components, xl: Components, vectors: dict[str, torch.Tensor]
) -> None:
    for components in (sd, xl):
        encoders: list[Any] = [e for e in (components.text_encoder, components.text_encoder_2) if e is not None]
        weights = [e.get_input_embeddings().weight.clone() for e in encoders]
        before = encode(components, "a red circle", "blurry")
        vocab = {"emb": TokenEmbedding(vectors)}
        assert not torch.equal(encode(components, "a emb circle", vocab=vocab).positive, before.positive)
        with pytest.raises(ValueError, match="size 5"):
            encode(components, "a emb circle", vocab={"emb": TokenEmbedding(dict.fromkeys(vectors, torch.zeros(1, 5)))})
        assert_same(encode(components, "a red circle", "blurry"), before)
        for encoder, weight in zip(encoders, weights, strict=True):
            table = encoder.get_input_embeddings()
            assert torch.equal(table.weight, weight) and not table._forward_hooks


def test_the_hook_only_changes_its_own_threads_passes(sd: Components, vectors: dict[str, torch.Tensor]) -> None:
    te = sd.text_encoder
    assert te is not None
    ids = torch.tensor([[512, 10, 11, 513] + [513] * 73])
    with torch.inference_mode():
        plain = te(ids)[0]
        seen: list[torch.Tensor] = []
        with weighted._embedding_fixes(te, [(1, vectors["text_encoder"])]):
            thread = threading.Thread(target=lambda: seen.append(te(ids)[0]))
            thread.start()
            thread.join()
            fixed = te(ids)[0]
    assert torch.equal(seen[0], plain) and not torch.equal(fixed, plain)


def test_a_plain_prompt_naming_an_embedding_takes_the_weighted_path(sd: Components) -> None:
    pair = [(Encoder("text_encoder", sd.text_encoder, sd.tokenizer), "a emb")]
    vocab = {"emb": TokenEmbedding({"text_encoder": torch.zeros(1, 32)})}
    assert weighted.is_simple(pair, None) and weighted.is_simple(pair, {"other": vocab["emb"]})
    assert not weighted.is_simple(pair, vocab)
    assert not weighted.is_simple([(pair[0][0], "x" * 76)], None)
