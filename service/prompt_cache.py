"""An LRU cache of text-encoder outputs, bounded in bytes, keyed by served identity and prompt inputs."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import torch

from service.observers import Observer
from service.requests import ServedIdentity

# (served identity, prompt, negative prompt, clip skip, guidance on): the variant is part of the identity, so
# fp16 and int8 text encoders of one revision never share an entry.
Key = tuple[ServedIdentity, str, str, int, bool]
Embeds = tuple[torch.Tensor, torch.Tensor | None]


def _nbytes(value: Embeds) -> int:
    return sum(t.numel() * t.element_size() for t in value if t is not None)


class PromptCache:
    """Maps (served identity, prompt, negative prompt, clip skip, guidance on) to (prompt, negative) embeddings."""

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


def cache_key(identity: ServedIdentity, prompt: str, negative: str, clip_skip: int, cfg: bool) -> Key:
    return (identity, prompt, negative if cfg else "", clip_skip, cfg)


def stats(cache: PromptCache) -> dict[str, Any]:
    return {"entries": len(cache), "bytes": cache.bytes, "hits": cache.hits, "misses": cache.misses}
