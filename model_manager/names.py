"""Validation of names, aliases, revisions, variants and Hub ids: no accepted value leads outside the store."""

from __future__ import annotations

import enum
import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_HEX = re.compile(r"[0-9a-f]{7,64}")
NAME_RULE = "must be 1 to 100 characters from A-Z a-z 0-9 . _ -, start with a letter or digit, and not contain '..'"


class Variant(enum.Enum):
    """Stored weight formats, in order of preference when a request names none."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def rank(self) -> int:
        return list(Variant).index(self)


def name_problem(value: str) -> str | None:
    """Why `value` is not a valid model name, alias or stored revision; None when it is."""
    if not value:
        return "is required"
    if ".." in value or not _NAME.fullmatch(value):
        return NAME_RULE
    return None


def is_safe_component(value: str) -> bool:
    """True when `value` can be used as one path component inside the store."""
    return name_problem(value) is None


def repo_id_problem(value: str) -> str | None:
    """Why `value` is not a Hub repository id (`owner/name` or `name`); None when it is."""
    if not value:
        return "is required"
    parts = value.split("/")
    if len(parts) > 2 or any(".." in p or not _REPO_PART.fullmatch(p) for p in parts):
        return "must be 'owner/name' with each part from A-Z a-z 0-9 . _ - (at most 96 characters), without '..'"
    return None


def hub_revision_problem(value: str) -> str | None:
    """Why `value` is not a usable Hub revision (branch, tag or commit); None when it is."""
    if len(value) > 255:
        return "must be at most 255 characters"
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        return "must not contain spaces or control characters"
    if ".." in value:
        return "must not contain '..'"
    return None


def is_hex(value: str) -> bool:
    """True for a lower-case hex digest of 7 to 64 digits (commit shas, content hashes)."""
    return bool(_HEX.fullmatch(value))


def parse_variant(value: str) -> Variant:
    """'fp16' -> Variant.FP16; raises ValueError naming the allowed values."""
    try:
        return Variant(value.lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(v.value for v in Variant)}") from None
