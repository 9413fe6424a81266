"""Chooses the files of a diffusers Stable Diffusion folder or repository that the pipeline needs (safetensors only).

SD 1.x/2.x folders have one text encoder; SDXL folders a second (text_encoder_2, tokenizer_2), and an SDXL refiner
only the second. Which components a folder has comes from its model_index.json when the caller has read it (local
imports), otherwise from the paths themselves (Hub pulls: the repository's model_index.json is checked against what
was fetched before anything is published)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from model_manager.weights import is_pickle_name

WEIGHT_BASES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_TOKENIZER_FILES = (
    ("vocab.json", True),
    ("merges.txt", True),
    ("tokenizer_config.json", False),
    ("special_tokens_map.json", False),
    ("tokenizer.json", False),
    ("added_tokens.json", False),
)
OTHER_FILES: dict[str, tuple[tuple[str, bool], ...]] = {
    "": (("model_index.json", True), ("sdserve.json", False)),
    "unet": (("config.json", True),),
    "vae": (("config.json", True),),
    "text_encoder": (("config.json", True),),
    "text_encoder_2": (("config.json", True),),
    "scheduler": (("scheduler_config.json", True),),
    "tokenizer": _TOKENIZER_FILES,
    "tokenizer_2": _TOKENIZER_FILES,
}
# Every folder has these; the text encoders and tokenizers depend on the family (see components()).
BASE_COMPONENTS = ("unet", "vae", "scheduler")


class SelectionError(ValueError):
    """The folder or repository lacks what a Stable Diffusion pipeline needs."""


@dataclasses.dataclass(frozen=True)
class Pick:
    """A file to fetch or copy: its path in the source and in the stored variant (variant infix removed)."""

    source: str
    dest: str


@dataclasses.dataclass(frozen=True)
class Selection:
    """The chosen files; `variant` is 'fp16' when the repository's fp16 files were chosen, else None."""

    picks: tuple[Pick, ...]
    variant: str | None


def components(available: set[str]) -> tuple[str, ...]:
    """The subfolders a folder with these files needs: the first text encoder and tokenizer unless only the second
    is there (an SDXL refiner), and the second wherever any of its files is."""
    second = any(p.startswith(("text_encoder_2/", "tokenizer_2/")) for p in available)
    first = not second or any(p.startswith(("text_encoder/", "tokenizer/")) for p in available)
    text = (("text_encoder", "tokenizer") if first else ()) + (("text_encoder_2", "tokenizer_2") if second else ())
    return BASE_COMPONENTS + text


def _weights(available: set[str], component: str, base: str, variant: str | None) -> list[Pick]:
    if variant is not None:
        path = f"{component}/{base}.{variant}.safetensors"
        return [Pick(path, f"{component}/{base}.safetensors")] if path in available else []
    single = f"{component}/{base}.safetensors"
    if single in available:
        return [Pick(single, single)]
    shard = re.compile(re.escape(f"{component}/{base}") + r"-\d{5}-of-\d{5}\.safetensors")
    shards = sorted(p for p in available if shard.fullmatch(p))
    index = f"{component}/{base}.safetensors.index.json"
    if shards and index in available:
        return [Pick(p, p) for p in [index, *shards]]
    return []


def _other_files(available: set[str], wanted: Sequence[str]) -> list[Pick]:
    picks: list[Pick] = []
    missing = []
    for folder, files in OTHER_FILES.items():
        if folder and folder not in wanted:
            continue
        for name, required in files:
            path = f"{folder}/{name}" if folder else name
            if path in available:
                picks.append(Pick(path, path))
            elif required:
                missing.append(path)
    if missing:
        raise SelectionError(f"not a Stable Diffusion diffusers model: missing {', '.join(missing)}")
    return picks


def select(paths: Iterable[str], prefer: str | None = None, subfolders: Sequence[str] | None = None) -> Selection:
    """The files to take; `prefer` 'fp16' takes fp16 files when every component has them. `subfolders` are the
    components the folder must have (from its model_index.json); None: guessed from the paths (components())."""
    available = set(paths)
    wanted = tuple(subfolders) if subfolders is not None else components(available)
    picks = _other_files(available, wanted)
    weighted = {c: b for c, b in WEIGHT_BASES.items() if c in wanted}
    attempts: list[str | None] = [prefer, None] if prefer else [None, "fp16"]
    for variant in attempts:
        chosen = [_weights(available, c, b, variant) for c, b in weighted.items()]
        if all(chosen):
            return Selection(tuple(picks + [p for group in chosen for p in group]), variant)
    for component, base in weighted.items():
        if _weights(available, component, base, None):
            continue
        pickled = sorted(p for p in available if p.startswith(component + "/") and is_pickle_name(p))
        if pickled:
            raise SelectionError(
                f"{component} has only pickled weights ({', '.join(pickled)}); sdserve loads safetensors only"
            )
        raise SelectionError(f"{component} has no {base}.safetensors weights")
    raise SelectionError("no complete set of safetensors weights")  # pragma: no cover - loop above always raises
