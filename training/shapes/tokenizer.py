"""A byte-level CLIP tokenizer whose merges make every word of the shapes language one token."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

from .grammar import WORDS

# Prompts are padded to this many tokens (the pipelines pad to the tokenizer's model_max_length). The longest
# prompt of the language is 13 tokens with its start and end tokens; 24 rather than SD's 77 leaves room and
# makes a training step 1.4x faster at batch 32 (the text encoder and the cross-attention keys scale with it).
MAX_LENGTH = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for bytes, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training on the word list until each word is a single symbol."""
    split = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in split:
            pairs.update(pairwise(symbols))
        if not pairs:
            return merges
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for i, symbols in enumerate(split):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            split[i] = out


def write_vocab_files(folder: Path) -> None:
    """Write vocab.json and merges.txt (CLIP format, "#version: 0.2" header)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    merges = learn_merges(WORDS)
    vocab = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Create, save and return the tokenizer (vocab.json and merges.txt kept beside what save_pretrained writes)."""
    write_vocab_files(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, pad_token=EOS)
    tok.save_pretrained(str(folder))
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {word!r} is {len(ids)} tokens")
    return tok


def copy_vocab_files(src: Path, dst: Path) -> None:
    """Copy vocab.json and merges.txt next to a saved tokenizer (save_pretrained omits them)."""
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
