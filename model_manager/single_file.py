"""Converts a single-file SD checkpoint (original LDM layout, safetensors) to a diffusers folder, offline."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from model_manager.progress import Reporter

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCHITECTURES = ("sd1", "sd1-inpainting", "sd2-base", "sd2-v", "sd2-inpainting")
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CLIP_VOCAB_SIZE = 49408
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ConversionError(ValueError):
    """The checkpoint cannot be converted with the chosen configs; the message says what does not match."""


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A safetensors checkpoint as a read-only mapping that reads each tensor only when asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        handle: Any = safe_open(str(path), framework="pt", device="cpu")
        self._handle = handle
        self._keys: list[str] = [str(k) for k in handle.keys()]  # noqa: SIM118 - not a dict
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        tensor: torch.Tensor = self._handle.get_tensor(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Converted:
    """What a conversion produced."""

    variant: str
    unet_in_channels: int
    architecture: str


def detect(ckpt: Mapping[str, torch.Tensor]) -> str:
    """The shipped architecture a checkpoint matches, from its keys and shapes; raises ConversionError."""
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in ckpt:
        raise ConversionError(
            "not a Stable Diffusion 1.x/2.x checkpoint in the original layout (no model.diffusion_model.* UNet keys)"
        )
    in_channels = ckpt[conv_in].shape[1]
    to_k = next((k for k in ckpt if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), "")
    context = ckpt[to_k].shape[-1] if to_k else 0
    has_clip = any(k.startswith(CLIP_PREFIX) for k in ckpt)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in ckpt)
    if context == 768 and has_clip and in_channels in (4, 9):
        return "sd1" if in_channels == 4 else "sd1-inpainting"
    if context == 1024 and has_open_clip and in_channels in (4, 9):
        return "sd2-v" if in_channels == 4 else "sd2-inpainting"
    raise ConversionError(
        f"unknown architecture (UNet input channels {in_channels}, cross-attention width {context}, text encoder "
        f"{'CLIP' if has_clip else 'OpenCLIP' if has_open_clip else 'missing'}); pass config_from with a diffusers "
        "folder of the same architecture"
    )


def weights_variant(ckpt: Mapping[str, torch.Tensor]) -> str:
    """fp32, fp16 or bf16: the dtype of the checkpoint's UNet, which the stored variant keeps."""
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in ckpt:
        raise ConversionError("the checkpoint has no UNet (model.diffusion_model.*)")
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(ckpt[conv_in].dtype, "fp32")


def _check(component: str, model: torch.nn.Module, state: dict[str, torch.Tensor], architecture: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        examples = []
        if missing:
            examples.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            examples.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            examples.append(f"{len(wrong)} with other shapes (e.g. {k}: {list(state[k].shape)} vs {list(expected[k])})")
        raise ConversionError(f"the checkpoint's {component} does not match {architecture}: " + ", ".join(examples))


def _text_state(ckpt: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if any(k.startswith(CLIP_PREFIX) for k in ckpt):
        state = convert_ldm_clip_checkpoint(ckpt)
    elif any(k.startswith(OPEN_CLIP_PREFIX) for k in ckpt):
        state = convert_open_clip_checkpoint(model, ckpt, prefix=OPEN_CLIP_PREFIX)
    else:
        raise ConversionError("the checkpoint has no text encoder (cond_stage_model.*)")
    # transformers 5 flattened CLIPTextModel: its keys have no `text_model.` prefix.
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    expected = set(model.state_dict())
    # Checkpoints carry position_ids buffers and projection weights that CLIPTextModel does not use.
    unused = ("position_ids", "text_projection.weight")
    return {k: v for k, v in state.items() if k in expected or not k.endswith(unused)}


def component_states(
    ckpt: Mapping[str, torch.Tensor], config_dir: Path, architecture: str
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(subfolder, diffusers state dict) for unet, vae and text_encoder, one at a time, each checked against its
    config (every key present, none extra, every shape equal); raises ConversionError naming the first mismatch."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    if UNET_PREFIX + "input_blocks.0.0.weight" not in ckpt:
        raise ConversionError("the checkpoint has no UNet (model.diffusion_model.*)")
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    state = convert_ldm_unet_checkpoint(ckpt, unet_config, extract_ema=True)
    _check("UNet", unet, state, architecture)
    yield "unet", state

    vae_config = json.loads((config_dir / "vae" / "config.json").read_text())
    with init_empty_weights():
        vae = AutoencoderKL.from_config(vae_config)
    state = convert_ldm_vae_checkpoint(ckpt, vae_config)
    _check("VAE", vae, state, architecture)
    yield "vae", state

    with init_empty_weights():
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    state = _text_state(ckpt, text)
    _check("text encoder", text, state, architecture)
    yield "text_encoder", state


_WEIGHT_FILE = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def convert(
    checkpoint: Path, config_dir: Path, vocab_dir: Path, out: Path, architecture: str, reporter: Reporter
) -> Converted:
    """Writes a diffusers folder for `checkpoint` to `out` using `config_dir`'s configs and `vocab_dir`'s vocabulary.

    `config_dir` holds model_index.json, unet/, vae/, text_encoder/, scheduler/ and tokenizer/ configs (a shipped
    architecture or a diffusers folder); `vocab_dir` holds tokenizer vocab.json and merges.txt. Tensors keep the
    checkpoint UNet's dtype, which names the variant.
    """
    from safetensors.torch import save_file

    with LazyCheckpoint(checkpoint) as ckpt:
        variant = weights_variant(ckpt)
        dtype = _DTYPES[variant]
        states = component_states(ckpt, config_dir, architecture)
        for component in ("unet", "vae", "text_encoder"):
            reporter.stage("converting", message=component)
            sub, state = next(states)
            (out / sub).mkdir(parents=True, exist_ok=True)
            tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
            save_file(tensors, str(out / sub / _WEIGHT_FILE[sub]), metadata={"format": "pt"})
            shutil.copyfile(config_dir / sub / "config.json", out / sub / "config.json")
            del state, tensors
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_dir / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (config_dir / "tokenizer" / name).is_file():
            shutil.copyfile(config_dir / "tokenizer" / name, out / "tokenizer" / name)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab_dir / name, out / "tokenizer" / name)
    shutil.copyfile(config_dir / "model_index.json", out / "model_index.json")
    in_channels = int(json.loads((config_dir / "unet" / "config.json").read_text()).get("in_channels", 4))
    return Converted(variant, in_channels, architecture)


def is_clip_vocab(folder: Path, vocab_size: int = CLIP_VOCAB_SIZE) -> bool:
    """True when `folder` holds a CLIP BPE vocabulary (vocab.json with `vocab_size` entries and merges.txt)."""
    try:
        return len(json.loads((folder / "vocab.json").read_text())) == vocab_size and (folder / "merges.txt").is_file()
    except (OSError, ValueError):
        return False
