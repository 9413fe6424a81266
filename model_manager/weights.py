"""Safetensors-only checks: header validation without loading, dtype detection, and refusal of pickled files."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
VARIANT_OF_DTYPE = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


class BadWeights(ValueError):
    """A weights file that is not a complete, valid safetensors file."""


def is_pickle_name(name: str) -> bool:
    """True for file names of pickled checkpoints, which sdserve never loads."""
    return name.lower().endswith(PICKLE_SUFFIXES)


def looks_pickled(path: Path) -> bool:
    """True when the file starts like a torch zip archive or a raw pickle, whatever its name."""
    with path.open("rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header of `path`, checked against the file size; raises BadWeights saying what is wrong."""
    size = path.stat().st_size
    if size < 8:
        raise BadWeights(f"{path.name}: {size} bytes is too short for a safetensors file")
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise BadWeights(f"{path.name}: not a safetensors file (header length {header_len}, file {size} bytes)")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadWeights(f"{path.name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadWeights(f"{path.name}: not a safetensors file (header is not an object)")
    data_len = size - 8 - header_len
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            width = DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BadWeights(f"{path.name}: malformed entry for tensor {key!r}") from None
        if not 0 <= begin <= end or end - begin != count * width:
            raise BadWeights(f"{path.name}: tensor {key!r} has inconsistent offsets")
        end_max = max(end_max, end)
    if end_max != data_len:
        what = "truncated" if end_max > data_len else "has trailing bytes"
        raise BadWeights(f"{path.name}: {what}: the header describes {end_max} bytes of data, the file has {data_len}")
    return header


def floating_dtype(header: dict[str, Any]) -> str:
    """The most common floating dtype (by element count) of a header's tensors, as a variant name."""
    counts: Counter[str] = Counter()
    for key, info in header.items():
        if key != "__metadata__" and info["dtype"] in VARIANT_OF_DTYPE:
            n = 1
            for dim in info["shape"]:
                n *= int(dim)
            counts[VARIANT_OF_DTYPE[info["dtype"]]] += n
    return counts.most_common(1)[0][0] if counts else "fp32"


def element_count(header: dict[str, Any], floating_only: bool = True) -> int:
    """Elements of all (floating) tensors described by a header."""
    total = 0
    for key, info in header.items():
        if key == "__metadata__" or (floating_only and info["dtype"] not in VARIANT_OF_DTYPE):
            continue
        n = 1
        for dim in info["shape"]:
            n *= int(dim)
        total += n
    return total
