"""LoRA adapters on a model's loaded components, through diffusers' LoRA loader (peft layers).

Loading wraps the targeted linear layers of the UNet and text encoders in peft LoRA layers once per adapter; a call
activates the adapters it names, at its scales, and deactivates them afterwards (`lora_active`), so the base
weights are never changed: with no adapter active a peft layer computes exactly its base layer, and a request
without adapters makes the same images as on a model that never loaded one. Adapters are never fused (fusing
changes the base weights in place, and unfusing does not restore them bit for bit).

Only the device worker's thread calls these (activation is state of the shared modules)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sdserve_core import families
from sdserve_core.components import Components
from sdserve_core.quant import TEXT_MODEL_PREFIX
from sdserve_core.tasks import Task

_PIPES: weakref.WeakKeyDictionary[Components, Any] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model's modules (shapes or names); the message says which."""


def _pipe(components: Components) -> Any:
    """A scheduler-less pipeline over the components, whose LoRA methods act on them (one per Components)."""
    with _LOCK:
        pipe = _PIPES.get(components)
        if pipe is None:
            pipe = families.get(components.family).pipeline(components, Task.GENERATE, None)
            _PIPES[components] = pipe
        return pipe


def _align_text_keys(state: dict[str, torch.Tensor], components: Components) -> dict[str, torch.Tensor]:
    """Text-encoder LoRA keys named as this transformers version names the encoder's modules: files written with
    transformers 4 say `text_encoder.text_model.encoder...`, transformers 5's CLIPTextModel has no `text_model`."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for prefix in _TEXT_PREFIXES:
            encoder = getattr(components, prefix[:-1], None)
            if not key.startswith(prefix) or encoder is None:
                continue
            rest = key[len(prefix) :]
            has_text_model = hasattr(encoder, "text_model")
            if rest.startswith(TEXT_MODEL_PREFIX) and not has_text_model:
                key = prefix + rest[len(TEXT_MODEL_PREFIX) :]
            elif not rest.startswith(TEXT_MODEL_PREFIX) and has_text_model:
                key = prefix + TEXT_MODEL_PREFIX + rest
        out[key] = tensor
    return out


def read_lora(components: Components, weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The adapter file's state dict in diffusers' layout (kohya/A1111 keys converted by diffusers' own converter)
    and kohya's network alphas (None for peft/diffusers files), text-encoder keys of both aligned to the model."""
    if weights.suffix != ".safetensors":
        raise AdapterLoadError(f"{weights.name}: only .safetensors adapters are loaded (pickle formats are refused)")
    state, alphas = _pipe(components).lora_state_dict(str(weights))
    aligned = None if alphas is None else _align_text_keys(dict(alphas), components)
    return _align_text_keys(state, components), aligned


def _load_into(pipe: Any, state: dict[str, torch.Tensor], alphas: Any, name: str) -> None:
    """diffusers' load_lora_weights after its state-dict step: the UNet's layers, then each text encoder's."""
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=name, _pipeline=pipe)
    for attr in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, attr, None)
        if encoder is None or not any(k.startswith(attr + ".") for k in state):
            continue
        pipe.load_lora_into_text_encoder(
            state, network_alphas=alphas, text_encoder=encoder, prefix=attr, adapter_name=name, _pipeline=pipe
        )


def load_lora(components: Components, name: str, weights: Path) -> int:
    """Loads the LoRA in `weights` into the components under `name`, inactive; returns the bytes it holds. Raises
    AdapterLoadError when its layers do not match the model's."""
    pipe = _pipe(components)
    state, alphas = read_lora(components, weights)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    try:
        _load_into(pipe, state, alphas, name)
    except (ValueError, RuntimeError, KeyError) as exc:
        with contextlib.suppress(Exception):
            pipe.delete_adapters([name])
        raise AdapterLoadError(f"adapter {name!r} does not fit the model's layers: {exc}") from exc
    if name not in _loaded(pipe):
        raise AdapterLoadError(f"adapter {name!r} has no layer that this model has (no LoRA key matched)")
    pipe.disable_lora()
    return nbytes


def _loaded(pipe: Any) -> set[str]:
    return {n for names in pipe.get_list_adapters().values() for n in names}


def loaded(components: Components) -> set[str]:
    """Names of the LoRAs loaded into the components."""
    return _loaded(_pipe(components))


def unload_lora(components: Components, name: str) -> None:
    """Removes a LoRA's layers' weights from the components (the peft wrappers stay and compute the base layer)."""
    pipe = _pipe(components)
    if name in _loaded(pipe):
        pipe.delete_adapters([name])
        pipe.disable_lora()


def changing(loras: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """The LoRAs that change a call: those at a scale other than 0. A call whose LoRAs are all at 0 is a plain
    call, in the same execution profile, so its images are the plain images to the bit."""
    return [(n, s) for n, s in loras if s != 0.0]


@contextlib.contextmanager
def lora_active(components: Components, loras: Sequence[tuple[str, float]]) -> Iterator[None]:
    """The named loaded LoRAs active at their scales for the duration; all inactive afterwards, whatever happens.
    Adapters at scale 0 are left inactive (they change nothing)."""
    active = changing(loras)
    if not active:
        yield
        return
    pipe = _pipe(components)
    pipe.enable_lora()
    try:
        pipe.set_adapters([n for n, _ in active], adapter_weights=[s for _, s in active])
        yield
    finally:
        pipe.disable_lora()
