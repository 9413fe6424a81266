"""Adapters for the tests, made here for a model folder: LoRAs with random (non-zero) weights through peft in
diffusers' layout, kohya-layout copies of them, and textual-inversion embeddings; each in the adapter folder format
(adapter.safetensors + adapter.json) of sdserve_core.adapter_file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdserve_core import adapter_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _text_lora(model: Path, sub: str, rank: int) -> dict[str, torch.Tensor]:
    import peft
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
    te = cls.from_pretrained(model / sub)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_TARGETS), init_lora_weights=False)
    te = peft.inject_adapter_in_model(config, te)
    return {f"{sub}.{k}": v for k, v in peft.get_peft_model_state_dict(te).items()}


def _lora_state(
    model: Path, unet: bool, text: bool, seed: int, rank: int, text_2: bool = False
) -> dict[str, torch.Tensor]:
    import diffusers
    import peft

    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    if unet:
        u = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS), init_lora_weights=False)
        u.add_adapter(config)
        state.update({f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(u).items()})
    if text:
        state.update(_text_lora(model, "text_encoder", rank))
    if text_2:
        state.update(_text_lora(model, "text_encoder_2", rank))
    # peft's random init is small; make the effect plainly visible at a few steps.
    return {k: (v * 4.0 if "lora_B" in k else v).contiguous() for k, v in state.items()}


def publish(folder: Path, state: dict[str, torch.Tensor], token: str = "") -> Path:
    """Writes `state` as an adapter folder (weights and manifest); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / adapter_file.WEIGHTS
    save_file(state, str(weights))
    adapter_file.write_manifest(folder, adapter_file.describe(weights, folder.name, "made by the tests", token))
    return folder


def make_lora(
    model: Path,
    dest: Path,
    *,
    unet: bool = True,
    text: bool = True,
    text_2: bool = False,
    seed: int = 0,
    rank: int = 4,
) -> dict[str, torch.Tensor]:
    """A LoRA for `model` in diffusers' layout at the adapter folder `dest` (`text_2`: SDXL's second text encoder
    too); returns its state dict."""
    state = _lora_state(model, unet, text, seed, rank, text_2)
    publish(dest, state)
    return state


def make_kohya(state: dict[str, torch.Tensor], dest: Path) -> None:
    """The same LoRA in kohya's layout (lora_down / lora_up / alpha = rank) at `dest`."""
    # Real kohya files name the text encoder's modules as transformers 4 did (text_model.encoder...).
    state = {_with_text_model(k): v for k, v in state.items()}
    names = adapter_file.to_kohya_keys(state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        out[names[key]] = tensor
        if "lora_A" in key:
            alpha = names[key].replace(".lora_down.weight", ".alpha")
            out[alpha] = torch.tensor(float(tensor.shape[0]))
    publish(dest, out)


def _with_text_model(key: str) -> str:
    head, sep, rest = key.partition(".")
    if head.startswith("text_encoder") and not rest.startswith("text_model."):
        return f"{head}{sep}text_model.{rest}"
    return key


def make_embedding(dest: Path, token: str, vectors: int, width: int, seed: int = 0) -> torch.Tensor:
    """A textual-inversion embedding in diffusers' layout ({token: [vectors, width]}) at `dest`."""
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(vectors, width, generator=g) * 0.5
    publish(dest, {token: tensor}, token)
    return tensor


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter folder's tensors."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = load_file(str(folder / adapter_file.WEIGHTS))
    return state
