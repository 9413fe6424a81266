"""Prompt tokenisation exactly as the pipelines do it: padded to MAX_LENGTH with the end token, no attention mask."""

from __future__ import annotations

import torch
from transformers import CLIPTokenizer

from .tokenizer import MAX_LENGTH


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """N x MAX_LENGTH token ids."""
    enc = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    ids: torch.Tensor = enc.input_ids
    return ids


def drop_prompts(ids: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row by the empty prompt with probability p (for classifier-free guidance)."""
    drop = torch.rand(len(ids), generator=generator) < p
    return torch.where(drop[:, None], empty[None, :], ids)
