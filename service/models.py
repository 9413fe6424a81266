"""Finds model folders, resolves names and aliases, and loads models onto the device."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from sdserve_core.manifest import verify_folder
from service.device import DeviceChoice
from service.requests import ServedIdentity, Task

log = logging.getLogger(__name__)

# Published linear latent-to-RGB projection for SD 1.x latents (as used by A1111 and ComfyUI previews).
SD15_LATENT_RGB = (
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    (0.0, 0.0, 0.0),
)


class ModelState(enum.Enum):
    """Where a model is in its life on this server."""

    ON_DISK = "on_disk"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class ModelNotFound(LookupError):
    """No model or alias has this name."""


class ModelUnusable(RuntimeError):
    """The model exists but cannot serve (load failed, or wrong kind for the task)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {}


def content_revision(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: the revision of an unmanaged folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model folder on disk and what its configs say, read without loading weights."""

    name: str
    path: Path
    revision: str
    variant: str
    description: str
    unet_in_channels: int
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    text_encoder_layers: int
    scheduler_config: dict[str, Any]
    inpaint_model: str
    latent_rgb: tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]
    # Registry slot id: the folder name for local models, NAME@REVISION:VARIANT for store variants.
    key: str = ""

    @property
    def slot(self) -> str:
        return self.key or self.name

    @property
    def identity(self) -> ServedIdentity:
        """The value every request served by these weights is keyed on."""
        return ServedIdentity(self.name, self.revision, self.variant, self.slot)

    @property
    def tasks(self) -> tuple[Task, ...]:
        if self.unet_in_channels == 9:
            return (Task.INPAINT,)
        return (Task.GENERATE, Task.EDIT, Task.INPAINT)

    @staticmethod
    def read(folder: Path, name: str | None = None, key: str = "") -> ModelEntry:
        """Reads a diffusers folder's configs; raises ValueError naming what is missing or wrong."""
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} has no model_index.json")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (folder / sub).is_dir():
                raise ValueError(f"{folder} has no {sub}/ folder")
        meta = _read_json(folder / "sdserve.json")
        unet = _read_json(folder / "unet" / "config.json")
        vae = _read_json(folder / "vae" / "config.json")
        text = _read_json(folder / "text_encoder" / "config.json")
        scale = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
        sample = unet.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, list) else int(sample)
        rgb = meta.get("latent_rgb")
        latent_rgb = SD15_LATENT_RGB
        if rgb:
            latent_rgb = (
                tuple(tuple(float(v) for v in row) for row in rgb["factors"]),
                tuple(float(v) for v in rgb.get("bias", (0.0, 0.0, 0.0))),  # type: ignore[assignment]
            )
        return ModelEntry(
            name=name or folder.name,
            path=folder,
            revision=str(meta.get("revision") or content_revision(folder)),
            variant=str(meta.get("variant", "fp32")),
            description=str(meta.get("description", "")),
            unet_in_channels=int(unet.get("in_channels", 4)),
            default_width=int(meta.get("default_width", sample * scale)),
            default_height=int(meta.get("default_height", sample * scale)),
            default_steps=int(meta.get("default_steps", 20)),
            default_guidance_scale=float(meta.get("default_guidance_scale", 7.5)),
            text_encoder_layers=int(text.get("num_hidden_layers", 12)),
            scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"),
            inpaint_model=str(meta.get("inpaint_model", "")),
            latent_rgb=latent_rgb,
            key=key,
        )


@dataclasses.dataclass
class LoadedModel:
    """A model's components on the device, shared by the three pipelines."""

    entry: ModelEntry
    components: dict[str, Any]
    choice: DeviceChoice
    load_seconds: float
    latent_rgb_factors: torch.Tensor
    latent_rgb_bias: torch.Tensor

    @property
    def name(self) -> str:
        return self.entry.name

    def pipeline(self, task: Task, scheduler: Any) -> Any:
        """A new pipeline object over the shared components with this request's own scheduler."""
        import diffusers

        cls = {
            Task.GENERATE: diffusers.StableDiffusionPipeline,
            Task.EDIT: diffusers.StableDiffusionImg2ImgPipeline,
            Task.INPAINT: diffusers.StableDiffusionInpaintPipeline,
        }[task]
        pipe = cls(**self.components, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load(entry: ModelEntry, choice: DeviceChoice) -> LoadedModel:
    """Loads a model's components (safetensors only) onto the chosen device and dtype."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    common: dict[str, Any] = {"torch_dtype": choice.dtype, "use_safetensors": True}
    if entry.variant == "int8":
        # int8 weight-only variants keep int8 weights on the device (see sdserve_core/quant.py).
        from sdserve_core.quant import load_int8_component

        unet = load_int8_component(UNet2DConditionModel, entry.path, "unet", choice.dtype, choice.device)
        text_encoder = load_int8_component(CLIPTextModel, entry.path, "text_encoder", choice.dtype, choice.device)
    else:
        unet = UNet2DConditionModel.from_pretrained(entry.path, subfolder="unet", **common)
        text_encoder = CLIPTextModel.from_pretrained(entry.path, subfolder="text_encoder", **common)
    vae = AutoencoderKL.from_pretrained(entry.path, subfolder="vae", **common)
    tokenizer = CLIPTokenizer.from_pretrained(entry.path, subfolder="tokenizer")
    for module in (unet, vae, text_encoder):
        module.to(choice.device)
        module.eval()
        module.requires_grad_(False)
    factors, bias = entry.latent_rgb
    return LoadedModel(
        entry=entry,
        components={
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
            "safety_checker": None,
            "feature_extractor": None,
            "image_encoder": None,
            "requires_safety_checker": False,
        },
        choice=choice,
        load_seconds=time.perf_counter() - start,
        latent_rgb_factors=torch.tensor(factors, dtype=torch.float32),
        latent_rgb_bias=torch.tensor(bias, dtype=torch.float32),
    )


@dataclasses.dataclass
class _Slot:
    entry: ModelEntry
    state: ModelState = ModelState.ON_DISK
    loaded: LoadedModel | None = None
    error: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class ModelRegistry:
    """The models this server knows, with public names, aliases and load state. Thread-safe.

    Slots hold one model folder each (id: folder name, or NAME@REVISION:VARIANT for store variants);
    public names map to slots; aliases map to public names or slot ids. Re-pointing a name or alias is
    atomic; jobs already holding an entry finish on it.
    """

    def __init__(self, model_dirs: Iterable[Path], choice: DeviceChoice, aliases: Iterable[tuple[str, str]] = ()):
        self._dirs = tuple(model_dirs)
        self._choice = choice
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._names: dict[str, str] = {}
        self._aliases: dict[str, str] = dict(aliases)
        self.default_model = ""
        # Each is called with (entry, seconds) after each successful load, on the loading thread.
        self.load_hooks: list[Callable[[ModelEntry, float], None]] = []
        self.rescan()

    def rescan(self) -> None:
        """Re-reads the local model folders; the first folder holding a name wins."""
        found: dict[str, ModelEntry] = {}
        for root in self._dirs:
            if not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if folder.name in found or folder.name.startswith(".") or not folder.is_dir():
                    continue
                if not (folder / "model_index.json").is_file():
                    continue
                try:
                    found[folder.name] = ModelEntry.read(folder)
                except (ValueError, KeyError, OSError) as exc:
                    log.warning("skipping model folder", extra={"folder": folder.name, "error": str(exc)})
        for entry in found.values():
            self.upsert(entry, names=(entry.name,))

    def upsert(self, entry: ModelEntry, names: Iterable[str] = ()) -> None:
        """Adds or replaces the slot of `entry` and points `names` (and its slot id) at it."""
        with self._lock:
            slot = self._slots.get(entry.slot)
            if slot is None or slot.entry.revision != entry.revision or slot.entry.path != entry.path:
                self._slots[entry.slot] = _Slot(entry)
            self._names[entry.slot] = entry.slot
            for name in names:
                self._names[name] = entry.slot

    def remove(self, slot_id: str) -> None:
        """Forgets a slot and the names pointing at it (its folder is gone)."""
        with self._lock:
            self._slots.pop(slot_id, None)
            for name in [n for n, s in self._names.items() if s == slot_id]:
                del self._names[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._aliases)

    def set_alias(self, alias: str, target: str) -> str | None:
        """Points `alias` at a name or slot id; returns the slot id it pointed at before."""
        with self._lock:
            before = self._slot_of(alias)
            self._aliases[alias] = target
            return before

    def remove_alias(self, alias: str) -> str | None:
        with self._lock:
            before = self._slot_of(alias)
            self._aliases.pop(alias, None)
            return before

    def _slot_of(self, name: str) -> str | None:
        name = self._aliases.get(name, name)
        return self._names.get(name)

    def slot_of(self, name: str) -> str | None:
        """The slot id a name or alias resolves to now, or None."""
        with self._lock:
            return self._slot_of(name)

    def referenced(self) -> set[str]:
        """Slot ids that a public name, alias or the default points at."""
        with self._lock:
            refs = {self._slot_of(a) for a in self._aliases}
            refs.add(self._slot_of(self.default_model))
            return {r for r in refs if r}

    def resolve(self, requested: str, task: Task) -> ModelEntry:
        """Name or alias (empty: default) to the entry that serves `task`."""
        name = requested or self.default_model
        with self._lock:
            slot_id = self._slot_of(name)
            slot = self._slots.get(slot_id) if slot_id else None
            if slot is None:
                raise ModelNotFound(name)
            entry = slot.entry
            if task not in entry.tasks:
                raise ModelUnusable(f"model {name!r} is an inpainting model; it cannot run {task.value}")
            if task is Task.INPAINT and entry.unet_in_channels == 4 and entry.inpaint_model:
                companion_id = self._slot_of(entry.inpaint_model)
                companion = self._slots.get(companion_id) if companion_id else None
                if companion is not None:
                    return companion.entry
            return entry

    def entry_of(self, name: str) -> ModelEntry | None:
        """The entry a name or alias (empty: the default) points at now, or None."""
        with self._lock:
            slot_id = self._slot_of(name or self.default_model)
            slot = self._slots.get(slot_id) if slot_id else None
            return slot.entry if slot is not None else None

    def state(self, slot_id: str) -> tuple[ModelState, str]:
        with self._lock:
            slot = self._slots[slot_id]
            return slot.state, slot.error

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [s.entry for _, s in sorted(self._slots.items())]

    def public_names(self, slot_id: str) -> list[str]:
        """Names (not aliases) that point at a slot."""
        with self._lock:
            return sorted(n for n, s in self._names.items() if s == slot_id and n != slot_id)

    def unload(self, slot_id: str) -> bool:
        """Drops the slot's loaded components; jobs still holding them finish first (refcounts)."""
        with self._lock:
            slot = self._slots.get(slot_id)
        if slot is None:
            return False
        with slot.lock:
            was = slot.loaded is not None
            slot.loaded = None
            if slot.state is ModelState.LOADED:
                slot.state = ModelState.ON_DISK
        return was

    def get_loaded(self, entry: ModelEntry) -> LoadedModel:
        """The loaded model for `entry`, loading it first if needed (worker or swap thread)."""
        with self._lock:
            slot = self._slots.get(entry.slot)
            if slot is None or slot.entry.revision != entry.revision:
                raise ModelUnusable(f"model {entry.name!r} revision {entry.revision} is no longer available")
        with slot.lock:
            if slot.loaded is not None:
                return slot.loaded
            # Nothing is loaded unless its files match the sidecar's manifest (digests cached by stat).
            problems = verify_folder(entry.path)
            if problems:
                slot.state = ModelState.FAILED
                slot.error = f"files do not match manifest.json: {problems[0]}"
                log.error("model refused", extra={"model": entry.slot, "problems": problems})
                raise ModelUnusable(f"model {entry.name!r} cannot be loaded: its {slot.error}")
            slot.state = ModelState.LOADING
            try:
                slot.loaded = load(entry, self._choice)
            except Exception as exc:
                slot.state = ModelState.FAILED
                slot.error = f"{type(exc).__name__}: {exc}"
                log.exception("model load failed", extra={"model": entry.slot})
                raise ModelUnusable(f"model {entry.name!r} failed to load") from exc
            slot.state = ModelState.LOADED
            slot.error = ""
            for hook in self.load_hooks:
                hook(entry, slot.loaded.load_seconds)
            log.info(
                "model loaded",
                extra={"model": entry.slot, "revision": entry.revision, "seconds": slot.loaded.load_seconds},
            )
            return slot.loaded
