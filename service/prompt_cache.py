"""An LRU cache of text-encoder outputs, bounded in bytes, keyed by served identity and prompt inputs."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from sdserve_core.prompt_syntax import PromptSyntaxError, parse_attention
from sdserve_core.prompts import PromptEmbeds, PromptInputs
from service.observers import Observer
from service.requests import ServedIdentity

# (served identity of the model whose text encoders ran, prompt inputs with the negative prompts blanked without
# guidance, guidance on): the variant is part of the identity, so fp16 and int8 text encoders of one revision never
# share an entry, and a refiner's encodings never pass for its base model's.
# The last part: (sha256, scale) of each adapter that changes the text encoders' output (LoRAs on a text encoder).
# The prompt texts are keyed by their parsed form (A1111 syntax: fragments and weights), so `(red)` and
# `(red:1.1)`, or `red` and `(red:1)`, share an entry: they encode to the same tensors.
Parsed = tuple[tuple[str, float], ...]
Texts = tuple[Parsed, Parsed, Parsed, Parsed, int, tuple[tuple[str, str], ...]]
Key = tuple[ServedIdentity, Texts, bool, tuple[tuple[str, float], ...]]
Embeds = PromptEmbeds


def _nbytes(value: Embeds) -> int:
    return value.nbytes


class PromptCache:
    """Maps (served identity, prompt inputs, guidance on) to the family's PromptEmbeds (SDXL: both encoders' outputs
    and the pooled embeddings)."""

    def __init__(self, max_bytes: int, observer: Observer | None = None):
        self.max_bytes = max_bytes
        self._observer = observer or Observer()
        self._items: collections.OrderedDict[Key, Embeds] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Key, compute: Callable[[], Embeds]) -> Embeds:
        """The cached embeddings for `key`, computing and storing them on a miss."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if found is not None:
            self._report(True)
            return found
        value = compute()
        size = _nbytes(value)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and key not in self._items:
                self._items[key] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= _nbytes(old)
        self._report(False)
        return value

    def drop(self, identity: ServedIdentity) -> None:
        """Forgets every entry of one served identity (after its weights are unloaded)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == identity]:
                self._bytes -= _nbytes(self._items.pop(key))

    def _report(self, hit: bool) -> None:
        self._observer.prompt_cache_lookup(hit)


def cache_key(
    identity: ServedIdentity, inputs: PromptInputs, cfg: bool, text_adapters: tuple[tuple[str, float], ...] = ()
) -> Key:
    if not cfg:
        inputs = dataclasses.replace(inputs, negative_prompt="", negative_prompt_2="")
    texts = (inputs.prompt, inputs.negative_prompt, inputs.prompt_2, inputs.negative_prompt_2)
    p, n, p2, n2 = (_parsed(t) for t in texts)
    return (identity, (p, n, p2, n2, inputs.clip_skip, inputs.embeddings), cfg, text_adapters)


def _parsed(text: str) -> Parsed:
    """The text's parsed form. A text that does not parse (validation refuses those first) keys on itself plus an
    empty fragment of the same weight, which no parse gives (the parser merges neighbours of equal weight)."""
    try:
        return tuple(parse_attention(text))
    except PromptSyntaxError:
        return ((text, 1.0), ("", 1.0))


def stats(cache: PromptCache) -> dict[str, Any]:
    return {"entries": len(cache), "bytes": cache.bytes, "hits": cache.hits, "misses": cache.misses}
