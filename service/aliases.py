"""Canary aliases: an alias whose requests are split between models by weight, each request picking its target from
its request id (the same id always picks the same model)."""

from __future__ import annotations

import hashlib

# A weighted alias's targets: (name or slot, weight), the weights positive integers.
Weighted = tuple[tuple[str, int], ...]


def parse_weighted(text: str) -> Weighted | None:
    """A weighted alias target `NAME*WEIGHT|NAME*WEIGHT...` (for example `a*90|b*10`), or None for a plain target;
    ValueError naming the rule for a malformed one."""
    if "|" not in text and "*" not in text:
        return None
    out = []
    for part in text.split("|"):
        name, sep, weight = part.strip().rpartition("*")
        if not sep or not name.strip() or not weight.strip().isdigit() or int(weight) < 1:
            raise ValueError(f"weighted target {part.strip()!r} is not NAME*WEIGHT with a whole weight of at least 1")
        out.append((name.strip(), int(weight)))
    if len({n for n, _ in out}) != len(out):
        raise ValueError(f"weighted target {text!r} names a model twice")
    return tuple(out)


def pick(targets: Weighted, key: str) -> str:
    """The target a request with `key` (its request id) goes to: a point from the key's SHA-256 on the weights'
    cumulative scale, so one id always picks the same target and ids spread in proportion to the weights."""
    total = sum(w for _, w in targets)
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % total
    for name, weight in targets:
        if point < weight:
            return name
        point -= weight
    return targets[-1][0]
