"""Converts a single-file SD checkpoint (original LDM or SGM layout, safetensors) to a diffusers folder, offline.

The UNet (model.diffusion_model.*) and the VAE (first_stage_model.*) have one layout in every such checkpoint. The
text encoders differ: SD 1.x/2.x keep one under cond_stage_model.* (CLIP in Hugging Face's layout, or OpenCLIP in
open_clip's); SDXL (Stability's generative-models, "SGM") under conditioner.embedders.N.*: the base and inpainting
models CLIP ViT-L at embedders.0.transformer.* and OpenCLIP ViT-bigG at embedders.1.model.*, the refiner only
OpenCLIP ViT-bigG, at embedders.0.model.*.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from model_manager.progress import Reporter
from sdserve_core import model_folder

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent / "configs"
SD_ARCHITECTURES = ("sd1", "sd1-inpainting", "sd2-base", "sd2-v", "sd2-inpainting")
SDXL_ARCHITECTURES = ("sdxl-base", "sdxl-refiner", "sdxl-inpainting")
ARCHITECTURES = SD_ARCHITECTURES + SDXL_ARCHITECTURES
UNET_PREFIX = "model.diffusion_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
# SDXL's additional (pooled text + size/crop/aesthetic-score) embedding: its input width tells base from refiner.
LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SGM_PREFIX = "conditioner.embedders."
_SGM_EMBEDDER = re.compile(r"conditioner\.embedders\.(\d+)\.(transformer|model)\.")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_TEXT_NAMES = {"text_encoder": "CLIP", "text_encoder_2": "OpenCLIP ViT-bigG"}
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


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Where one text encoder's weights are in a checkpoint: the key prefix, and whether they are in open_clip's
    layout (else in Hugging Face's CLIPTextModel layout)."""

    prefix: str
    open_clip: bool


def text_sources(ckpt: Mapping[str, torch.Tensor]) -> dict[str, TextSource]:
    """The text encoders a checkpoint holds, by the diffusers subfolder they become: an SD 1.x/2.x checkpoint's one
    is text_encoder; in an SDXL checkpoint CLIP (embedders.0.transformer) is text_encoder and the OpenCLIP one
    (the last embedders.N.model) text_encoder_2."""
    if any(k.startswith(CLIP_PREFIX) for k in ckpt):
        return {"text_encoder": TextSource(CLIP_PREFIX, False)}
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in ckpt):
        return {"text_encoder": TextSource(OPEN_CLIP_PREFIX, True)}
    embedders: dict[int, str] = {}
    for key in ckpt:
        if m := _SGM_EMBEDDER.match(key):
            embedders[int(m[1])] = m[2]
    out: dict[str, TextSource] = {}
    if embedders.get(0) == "transformer":
        out["text_encoder"] = TextSource(f"{SGM_PREFIX}0.transformer.", False)
    open_clip = [i for i, kind in sorted(embedders.items()) if kind == "model"]
    if open_clip:
        out["text_encoder_2"] = TextSource(f"{SGM_PREFIX}{open_clip[-1]}.model.", True)
    return out


def text_encoders(config_dir: Path) -> tuple[str, ...]:
    """The text encoder subfolders a configs folder's model_index.json asks for (SDXL's refiner: text_encoder_2
    only); ConversionError when model_index.json is not valid JSON."""
    try:
        needed = model_folder.required_subfolders(config_dir)
    except ValueError as exc:
        raise ConversionError(f"model_index.json is not valid JSON ({exc})") from None
    return tuple(sub for sub in needed if sub in TEXT_ENCODERS)


def shipped_signature(architecture: str) -> tuple[tuple[str, ...], int, int, int]:
    """(text encoders, UNet input channels, cross-attention width, additional-embedding inputs) of a shipped
    architecture, from its configs."""
    folder = CONFIGS / architecture
    unet = model_folder.read_json(folder / "unet" / "config.json")
    adm = int(unet.get("projection_class_embeddings_input_dim") or 0)
    return text_encoders(folder), int(unet["in_channels"]), int(unet["cross_attention_dim"]), adm


def _describe(signature: tuple[tuple[str, ...], int, int, int]) -> str:
    encoders, in_channels, context, adm = signature
    names = " + ".join(_TEXT_NAMES[e] for e in encoders) or "none"
    return f"text encoders {names}, UNet input channels {in_channels}, cross-attention {context}, add-embedding {adm}"


def _detect_sdxl(ckpt: Mapping[str, torch.Tensor], in_channels: int, context: int) -> str:
    adm = int(ckpt[LABEL_EMB].shape[1]) if LABEL_EMB in ckpt else 0
    found = (tuple(sorted(text_sources(ckpt))), in_channels, context, adm)
    for architecture in SDXL_ARCHITECTURES:
        if shipped_signature(architecture) == found:
            return architecture
    shipped = ", ".join(f"{a} ({'/'.join(str(v) for v in shipped_signature(a)[1:])})" for a in SDXL_ARCHITECTURES)
    raise ConversionError(
        f"unknown architecture: an SDXL-layout checkpoint (conditioner.embedders.*) with {_describe(found)}; the "
        f"shipped ones are {shipped} (input channels/cross-attention/add-embedding); pass config_from with a "
        "diffusers folder of the same architecture"
    )


def detect(ckpt: Mapping[str, torch.Tensor]) -> str:
    """The shipped architecture a checkpoint matches, from its keys and shapes; raises ConversionError."""
    if CONV_IN not in ckpt:
        raise ConversionError(
            "not a Stable Diffusion 1.x, 2.x or XL checkpoint in the original layout (no model.diffusion_model.* "
            "UNet keys)"
        )
    in_channels = int(ckpt[CONV_IN].shape[1])
    to_k = next((k for k in ckpt if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), "")
    context = int(ckpt[to_k].shape[-1]) if to_k else 0
    if any(k.startswith(SGM_PREFIX) for k in ckpt):
        return _detect_sdxl(ckpt, in_channels, context)
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
    if CONV_IN not in ckpt:
        raise ConversionError("the checkpoint has no UNet (model.diffusion_model.*)")
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(ckpt[CONV_IN].dtype, "fp32")


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


# Checkpoints carry position_ids buffers and projection weights that CLIPTextModel does not use.
_UNUSED_TEXT_KEYS = ("position_ids", "text_projection.weight")


def _fit_text_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Names each tensor as the model does: transformers 5's CLIPTextModel has no `text_model.` prefix, its
    CLIPTextModelWithProjection keeps it. Unused tensors are dropped; anything else stays, for _check to name."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = key.removeprefix("text_model.")
        name = next((k for k in (key, bare, "text_model." + bare) if k in expected), None)
        if name is not None:
            out[name] = value
        elif not key.endswith(_UNUSED_TEXT_KEYS):
            out[key] = value
    return out


def _text_class(config_dir: Path, sub: str) -> Any:
    """The transformers class model_index.json names for text encoder `sub` (CLIPTextModel when it names none)."""
    entry = model_folder.read_json(config_dir / model_folder.MODEL_INDEX).get(sub)
    name = str(entry[1]) if isinstance(entry, list) and len(entry) == 2 else "CLIPTextModel"
    if name not in TEXT_CLASSES:
        raise ConversionError(f"model_index.json's {sub} is a {name}; single files convert {', '.join(TEXT_CLASSES)}")
    import transformers

    return getattr(transformers, name)


def _text_state(
    ckpt: Mapping[str, torch.Tensor], config_dir: Path, sub: str, source: TextSource, architecture: str
) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig

    cls = _text_class(config_dir, sub)
    with init_empty_weights():
        model = cls(CLIPTextConfig.from_pretrained(config_dir / sub))
    if source.open_clip:
        state = convert_open_clip_checkpoint(model, ckpt, prefix=source.prefix)
    else:
        state = convert_ldm_clip_checkpoint(ckpt, remove_prefix=source.prefix)
    state = _fit_text_keys(state, set(model.state_dict()))
    _check("text encoder" if sub == "text_encoder" else "second text encoder", model, state, architecture)
    return state


def _no_text_encoder(sub: str, sources: dict[str, TextSource], architecture: str) -> ConversionError:
    found = ", ".join(f"{s} at {src.prefix}*" for s, src in sorted(sources.items())) or "none"
    return ConversionError(
        f"{architecture} needs a {sub} ({_TEXT_NAMES[sub]}) that the checkpoint does not have (text encoders found: "
        f"{found}; SD 1.x/2.x keep theirs under {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*, SDXL under {SGM_PREFIX}N.*)"
    )


def _unet_state(ckpt: Mapping[str, torch.Tensor], config_dir: Path, architecture: str) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = json.loads((config_dir / "unet" / "config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    state: dict[str, torch.Tensor] = convert_ldm_unet_checkpoint(ckpt, config, extract_ema=True)
    _check("UNet", unet, state, architecture)
    return state


def _vae_state(ckpt: Mapping[str, torch.Tensor], config_dir: Path, architecture: str) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = json.loads((config_dir / "vae" / "config.json").read_text())
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    state: dict[str, torch.Tensor] = convert_ldm_vae_checkpoint(ckpt, config)
    _check("VAE", vae, state, architecture)
    return state


def component_states(
    ckpt: Mapping[str, torch.Tensor], config_dir: Path, architecture: str
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(subfolder, diffusers state dict) for unet, vae and each text encoder the configs name (text_encoder and/or
    text_encoder_2), one at a time, each checked against its config (every key present, none extra, every shape
    equal); raises ConversionError naming the first mismatch."""
    if CONV_IN not in ckpt:
        raise ConversionError("the checkpoint has no UNet (model.diffusion_model.*)")
    yield "unet", _unet_state(ckpt, config_dir, architecture)
    yield "vae", _vae_state(ckpt, config_dir, architecture)
    sources = text_sources(ckpt)
    for sub in text_encoders(config_dir):
        if sub not in sources:
            raise _no_text_encoder(sub, sources, architecture)
        yield sub, _text_state(ckpt, config_dir, sub, sources[sub], architecture)


_WEIGHT_FILE = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}


def _copy_configs(config_dir: Path, vocab_dir: Path, out: Path) -> None:
    """The scheduler config, each tokenizer the configs name (their settings, `vocab_dir`'s vocabulary) and
    model_index.json."""
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_dir / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    tokenizers = [s for s in model_folder.required_subfolders(config_dir) if s.startswith("tokenizer")]
    for tokenizer in tokenizers:
        (out / tokenizer).mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (config_dir / tokenizer / name).is_file():
                shutil.copyfile(config_dir / tokenizer / name, out / tokenizer / name)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(vocab_dir / name, out / tokenizer / name)
    shutil.copyfile(config_dir / "model_index.json", out / "model_index.json")


def convert(
    checkpoint: Path, config_dir: Path, vocab_dir: Path, out: Path, architecture: str, reporter: Reporter
) -> Converted:
    """Writes a diffusers folder for `checkpoint` to `out` using `config_dir`'s configs and `vocab_dir`'s vocabulary.

    `config_dir` holds model_index.json, unet/, vae/, the text encoders' and tokenizers' folders it names, and
    scheduler/ (a shipped architecture or a diffusers folder); `vocab_dir` holds tokenizer vocab.json and
    merges.txt (every CLIP tokenizer of SD 1.x, 2.x and XL has the same). Tensors keep the checkpoint UNet's dtype,
    which names the variant.
    """
    from safetensors.torch import save_file

    subfolders = ("unet", "vae", *text_encoders(config_dir))
    with LazyCheckpoint(checkpoint) as ckpt:
        variant = weights_variant(ckpt)
        dtype = _DTYPES[variant]
        states = component_states(ckpt, config_dir, architecture)
        for component in subfolders:
            reporter.stage("converting", message=component)
            sub, state = next(states)
            (out / sub).mkdir(parents=True, exist_ok=True)
            tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
            save_file(tensors, str(out / sub / _WEIGHT_FILE[sub]), metadata={"format": "pt"})
            shutil.copyfile(config_dir / sub / "config.json", out / sub / "config.json")
            del state, tensors
    _copy_configs(config_dir, vocab_dir, out)
    in_channels = int(json.loads((config_dir / "unet" / "config.json").read_text()).get("in_channels", 4))
    return Converted(variant, in_channels, architecture)


def is_clip_vocab(folder: Path, vocab_size: int = CLIP_VOCAB_SIZE) -> bool:
    """True when `folder` holds a CLIP BPE vocabulary (vocab.json with `vocab_size` entries and merges.txt)."""
    try:
        return len(json.loads((folder / "vocab.json").read_text())) == vocab_size and (folder / "merges.txt").is_file()
    except (OSError, ValueError):
        return False
