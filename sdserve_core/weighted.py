"""A1111's chunked, weighted CLIP prompt encoding, over transformers' CLIP text encoders and tokenizers.

This is `modules/sd_hijack_clip.py::FrozenCLIPEmbedderWithCustomWordsBase` with the "Original" emphasis: the
prompt is parsed (sdserve_core.prompt_syntax.parse_attention), each fragment is tokenized without special tokens,
the tokens fill chunks of `model_max_length - 2` (75 for SD), breaking after a comma among a full chunk's last 20
tokens and at every BREAK; each chunk is [BOS] + tokens + [EOS] + padding, encoded on its own, its vectors
multiplied by their tokens' weights and rescaled to the chunk's original mean; the chunks are concatenated along
the sequence axis. Textual-inversion embeddings put their vectors at their token's positions through a forward hook
on the encoder's token-embedding table, held only for the call. docs/prompts.md describes it all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from sdserve_core.prompt_syntax import BREAK, is_plain, parse_attention

__all__ = ["COMMA_BACKTRACK", "Chunk", "Encoder", "TokenEmbedding", "chunks_of", "encode", "is_simple"]

# A1111's comma_padding_backtrack default: a full chunk breaks after a comma among its last this many tokens.
COMMA_BACKTRACK = 20

# The id at an embedding's positions, whose rows the hook replaces (A1111 puts 0 there too).
PLACEHOLDER = 0

Item = int | torch.Tensor  # a token id, or an embedding's vectors [n, dim] (n token positions)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenEmbedding:
    """A textual-inversion embedding: its vectors [n, dim] for each text encoder it has them for, keyed by the
    component's name ("text_encoder", "text_encoder_2")."""

    vectors: dict[str, torch.Tensor]

    def rows(self, encoder: str, token: str) -> torch.Tensor:
        """The vectors for `encoder`; ValueError when the embedding has none for it."""
        found = self.vectors.get(encoder)
        if found is None:
            have = ", ".join(sorted(self.vectors)) or "none"
            raise ValueError(f"embedding {token!r} has no vectors for {encoder} (it has: {have})")
        return found.reshape(-1, found.shape[-1])


@dataclasses.dataclass
class Chunk:
    """One chunk: its token ids and weights (with BOS, EOS and padding once finished) and the embeddings put in
    it: (offset, vectors)."""

    ids: list[int] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)
    fixes: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A text encoder as one prompt is encoded with it: `name` is its component name (the key of its embedding
    vectors); `hidden` the index into its hidden states (None: its first output, the last layer's state);
    `final_norm` whether that hidden state goes through the final layer norm (SD 1.x's clip_skip)."""

    name: str
    module: Any
    tokenizer: Any
    hidden: int | None = None
    final_norm: bool = False

    @property
    def chunk_size(self) -> int:
        """Prompt tokens per chunk: the tokenizer's length less BOS and EOS (75 for SD's 77)."""
        return int(self.tokenizer.model_max_length) - 2


def _ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)


def _token_pattern(vocab: Mapping[str, TokenEmbedding]) -> re.Pattern[str] | None:
    """Matches any embedding token standing on its own (not inside a longer word), longest token first."""
    if not vocab:
        return None
    names = "|".join(re.escape(t) for t in sorted(vocab, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{names})(?!\w)")


def mentions(text: str, vocab: Mapping[str, TokenEmbedding]) -> bool:
    """Whether an embedding token of `vocab` appears in `text`."""
    pattern = _token_pattern(vocab)
    return pattern is not None and pattern.search(text) is not None


def is_simple(pairs: Sequence[tuple[Encoder, str]], vocab: Mapping[str, TokenEmbedding] | None) -> bool:
    """Whether every text is plain (no syntax), fits one chunk of its encoder and names no embedding: then the
    diffusers path encodes it exactly as before."""
    for encoder, text in pairs:
        if not is_plain(text) or mentions(text, vocab or {}):
            return False
        if len(_ids(encoder.tokenizer, text)) > encoder.chunk_size:
            return False
    return True


def _items(
    encoder: Encoder, text: str, pattern: re.Pattern[str] | None, vocab: Mapping[str, TokenEmbedding]
) -> list[Item]:
    """A fragment's token ids, with an embedding's vectors wherever its token stands (the text around it is
    tokenized piece by piece)."""
    if pattern is None:
        return list(_ids(encoder.tokenizer, text))
    items: list[Item] = []
    start = 0
    for match in pattern.finditer(text):
        items += _ids(encoder.tokenizer, text[start : match.start()])
        items.append(vocab[match.group(0)].rows(encoder.name, match.group(0)))
        start = match.end()
    items += _ids(encoder.tokenizer, text[start:])
    return items


class _Chunker:
    """A1111's tokenize_line loop: fills chunks token by token."""

    def __init__(self, size: int, comma: int | None):
        self.size, self.comma = size, comma
        self.chunks: list[Chunk] = []
        self.chunk = Chunk()
        self.last_comma = -1

    def next_chunk(self) -> None:
        self.chunks.append(self.chunk)
        self.chunk = Chunk()
        self.last_comma = -1

    def _backtrack(self) -> None:
        """Moves what follows the last comma to a new chunk (its embeddings too, which A1111 leaves behind)."""
        cut, old = self.last_comma + 1, self.chunk
        moved = Chunk(old.ids[cut:], old.weights[cut:], [(o - cut, v) for o, v in old.fixes if o >= cut])
        self.chunk = Chunk(old.ids[:cut], old.weights[:cut], [(o, v) for o, v in old.fixes if o < cut])
        self.next_chunk()
        self.chunk = moved

    def add(self, item: Item, weight: float) -> None:
        full = len(self.chunk.ids) == self.size
        if isinstance(item, int) and item == self.comma:
            self.last_comma = len(self.chunk.ids)
        elif full and self.last_comma != -1 and len(self.chunk.ids) - self.last_comma <= COMMA_BACKTRACK:
            self._backtrack()
        if len(self.chunk.ids) == self.size:
            self.next_chunk()
        if isinstance(item, int):
            self.chunk.ids.append(item)
            self.chunk.weights.append(weight)
            return
        count = int(item.shape[0])
        if count > self.size:
            raise ValueError(f"an embedding of {count} vectors does not fit a chunk of {self.size} tokens")
        if len(self.chunk.ids) + count > self.size:
            self.next_chunk()
        self.chunk.fixes.append((len(self.chunk.ids), item))
        self.chunk.ids += [PLACEHOLDER] * count
        self.chunk.weights += [weight] * count

    def finish(self) -> list[Chunk]:
        if self.chunk.ids or not self.chunks:
            self.next_chunk()
        return self.chunks


def _comma(tokenizer: Any) -> int | None:
    ids = _ids(tokenizer, ",")
    return ids[0] if len(ids) == 1 else None


def chunks_of(encoder: Encoder, text: str, vocab: Mapping[str, TokenEmbedding] | None = None) -> list[Chunk]:
    """The finished chunks of `text` for `encoder` (each model_max_length ids long)."""
    vocab = vocab or {}
    pattern = _token_pattern(vocab)
    chunker = _Chunker(encoder.chunk_size, _comma(encoder.tokenizer))
    for fragment, weight in parse_attention(text):
        if (fragment, weight) == BREAK:
            chunker.next_chunk()
            continue
        for item in _items(encoder, fragment, pattern, vocab):
            chunker.add(item, weight)
    return [_finished(encoder, c) for c in chunker.finish()]


def _finished(encoder: Encoder, chunk: Chunk) -> Chunk:
    """[BOS] + ids + [EOS] * (to the chunk size + 1); then, as A1111 does for tokenizers whose padding is not EOS,
    everything after the first EOS becomes padding: exactly the ids of the tokenizer's own max_length padding."""
    tok = encoder.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    to_add = encoder.chunk_size - len(chunk.ids)
    ids = [bos, *chunk.ids, *[eos] * (to_add + 1)]
    first_end = ids.index(eos)
    ids[first_end + 1 :] = [pad] * (len(ids) - first_end - 1)
    weights = [1.0, *chunk.weights, *[1.0] * (to_add + 1)]
    return Chunk(ids, weights, [(o + 1, v) for o, v in chunk.fixes])


def empty_chunk(encoder: Encoder) -> Chunk:
    """The chunk of an empty prompt, which pads a prompt with fewer chunks than the others of its call."""
    return _finished(encoder, Chunk())


@contextlib.contextmanager
def _embedding_fixes(module: Any, fixes: list[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """Puts `fixes` (offset, vectors) into the token embeddings of this thread's forward passes of `module` while
    the block runs; the hook is removed afterwards and no weight or tokenizer is touched."""
    if not fixes:
        yield
        return
    table = module.get_input_embeddings()
    for _, vectors in fixes:
        if vectors.shape[-1] != table.embedding_dim:
            raise ValueError(f"embedding vectors of size {vectors.shape[-1]}; this encoder's are {table.embedding_dim}")
    thread = threading.get_ident()

    def hook(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != thread:
            return None
        out = output.clone()
        for offset, vectors in fixes:
            out[:, offset : offset + vectors.shape[0]] = vectors.to(out.device, out.dtype)
        return out

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_chunk(
    encoder: Encoder, chunk: Chunk, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk's hidden states [1, length, dim] (unweighted) and the encoder's pooled output, if it has one."""
    ids = torch.tensor([chunk.ids], dtype=torch.long, device=device)
    module = encoder.module
    with _embedding_fixes(module, chunk.fixes):
        if encoder.hidden is None:
            out = module(ids)
            hidden = out[0]
        else:
            out = module(ids, output_hidden_states=True)
            hidden = out.hidden_states[encoder.hidden]
    if encoder.final_norm:
        text_model: Any = getattr(module, "text_model", module)
        hidden = text_model.final_layer_norm(hidden)
    pooled = out[0] if out[0].ndim == 2 else None
    return hidden, pooled


def emphasis(z: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """A1111's "Original" emphasis: each token's vector times its weight, then the whole chunk rescaled to its
    original mean (computed in float32; unchanged when every weight is 1).

    The rescale divides by the weighted chunk's mean. An encoder whose last LayerNorm has no bias (randomly
    initialised or tiny models) gives hidden states with a mean of almost exactly 0, where that division turns the
    embeddings into huge values or NaN (a black image); there the weighted vectors are kept unrescaled. Real CLIP
    towers have means far from 0 and are rescaled exactly as A1111 does."""
    if all(w == 1.0 for w in weights):
        return z
    zf = z.float()
    original_mean = zf.mean()
    scaled = zf * torch.tensor(weights, dtype=torch.float32, device=z.device).view(1, -1, 1)
    new_mean = scaled.mean()
    if not bool(torch.isfinite(original_mean / new_mean)) or new_mean.abs() <= 1e-3 * zf.abs().mean():
        return scaled.to(z.dtype)
    return (scaled * (original_mean / new_mean)).to(z.dtype)


def encode(
    pairs: Sequence[tuple[Encoder, str]], vocab: Mapping[str, TokenEmbedding] | None, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each (encoder, text)'s weighted embeddings [1, chunks * length, dim] and its first chunk's pooled output
    (None for encoders without one). Every text gets as many chunks as the longest (empty chunks after it), so
    the results of one call have one sequence length."""
    chunked = [chunks_of(encoder, text, vocab) for encoder, text in pairs]
    count = max(len(c) for c in chunked)
    results: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for (encoder, _), chunks in zip(pairs, chunked, strict=True):
        chunks = chunks + [empty_chunk(encoder)] * (count - len(chunks))
        parts, pooled = [], None
        for i, chunk in enumerate(chunks):
            hidden, chunk_pooled = encode_chunk(encoder, chunk, device)
            parts.append(emphasis(hidden, chunk.weights))
            pooled = chunk_pooled if i == 0 else pooled
        results.append((torch.cat(parts, dim=1), pooled))
    return results
