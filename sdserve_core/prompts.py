"""What a prompt is on its way into a pipeline: the texts (PromptInputs) and the text encoders' outputs
(PromptEmbeds), whose shape depends on the family (SDXL adds pooled embeddings)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class PromptInputs:
    """One request's prompt texts. `prompt_2` / `negative_prompt_2` go to SDXL's second text encoder (empty: the
    first prompt's text); `clip_skip` skips that many final layers of the text encoder. The texts may use the
    A1111 syntax of docs/prompts.md. `embeddings` are the (token, sha256) of the textual-inversion embeddings the
    prompts use: part of the prompt-cache key, since the same text means other vectors with another file."""

    prompt: str
    negative_prompt: str = ""
    prompt_2: str = ""
    negative_prompt_2: str = ""
    clip_skip: int = 0
    embeddings: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
    """Text embeddings for one or more images, batch-first. `negative` is None without classifier-free guidance;
    `pooled` / `negative_pooled` are SDXL's pooled (projected) embeddings, None for families without them."""

    positive: torch.Tensor
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.positive, self.negative, self.pooled, self.negative_pooled) if t is not None)

    @property
    def seq_len(self) -> int:
        """The embeddings' sequence length: the text encoders' length (77 for SD) times the prompt's chunks. Only
        embeddings of one length can share a call (PromptEmbeds.cat)."""
        return int(self.positive.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def repeat(self, count: int) -> PromptEmbeds:
        """The same embeddings for `count` images."""
        return self._map(lambda t: t.repeat(count, *([1] * (t.dim() - 1))))

    def first(self) -> PromptEmbeds:
        """The first image's embeddings."""
        return self._map(lambda t: t[:1])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PromptEmbeds:
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return PromptEmbeds(fn(self.positive), opt(self.negative), opt(self.pooled), opt(self.negative_pooled))

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """The embeddings of several requests, one after another (all of one family, guidance setting and
        seq_len; ValueError for mixed lengths)."""
        lengths = sorted({p.seq_len for p in parts})
        if len(lengths) > 1:
            raise ValueError(f"prompt embeddings of different lengths {lengths} cannot share a call")
        fields = ("positive", "negative", "pooled", "negative_pooled")
        joined: list[torch.Tensor | None] = []
        for name in fields:
            values = [getattr(p, name) for p in parts]
            joined.append(None if values[0] is None else torch.cat(values))
        positive = joined[0]
        assert positive is not None
        return PromptEmbeds(positive, joined[1], joined[2], joined[3])
