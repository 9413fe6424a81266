"""Finds model folders, resolves names and aliases, and loads models onto the device."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdserve_core import adapter_file, families, memory, model_folder
from sdserve_core.components import Components, component_classes, load_components
from sdserve_core.manifest import verify_folder
from sdserve_core.memory import MemoryPolicy
from sdserve_core.pipeline import run as pipeline
from service.aliases import Weighted, parse_weighted, pick
from service.device import DeviceChoice
from service.errors import ModelNotFound, ModelUnusable
from service.observers import Observer
from service.requests import ServedIdentity, Task

log = logging.getLogger(__name__)

# Published linear latent-to-RGB projection for SD 1.x latents (as used by A1111 and ComfyUI previews).
SD15_LATENT_RGB = families.get("sd15").latent_rgb


class ModelState(enum.Enum):
    """Where a model is in its life on this server."""

    ON_DISK = "on_disk"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


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
    # The registry slot: the folder name for local models, NAME@REVISION:VARIANT for stored variants.
    slot: str = ""
    # The model's family (sdserve_core.families), the tasks it runs, and whether it is an SDXL refiner.
    family: str = "sd15"
    task_list: tuple[Task, ...] = (Task.GENERATE, Task.EDIT, Task.INPAINT)
    refiner: bool = False
    # The base architecture adapters must match (sdserve_core.adapter_file.model_base), e.g.
    # "cross_attention_dim=768,text_width=768".
    base: str = ""

    def __post_init__(self) -> None:
        if not self.slot:
            object.__setattr__(self, "slot", self.name)

    @property
    def identity(self) -> ServedIdentity:
        """The value every request served by these weights is keyed on."""
        return ServedIdentity(self.name, self.revision, self.variant, self.slot)

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.task_list

    @staticmethod
    def read(folder: Path, name: str | None = None, slot: str = "") -> ModelEntry:
        """Reads a diffusers folder's configs; raises ValueError naming what is missing or wrong."""
        model_folder.check_layout(folder)
        meta = model_folder.read_meta(folder)
        unet = model_folder.read_json(folder / "unet" / "config.json")
        encoder = "text_encoder" if (folder / "text_encoder").is_dir() else "text_encoder_2"
        text = model_folder.read_json(folder / encoder / "config.json")
        family = families.family_of(folder)
        traits = families.traits_of(folder)
        return ModelEntry(
            name=name or folder.name,
            path=folder,
            revision=meta.revision or content_revision(folder),
            variant=meta.variant,
            description=meta.description,
            unet_in_channels=int(unet.get("in_channels", 4)),
            default_width=meta.default_width,
            default_height=meta.default_height,
            default_steps=meta.default_steps,
            default_guidance_scale=meta.default_guidance_scale,
            text_encoder_layers=int(text.get("num_hidden_layers", 12)),
            scheduler_config=model_folder.read_json(folder / "scheduler" / "scheduler_config.json"),
            inpaint_model=meta.inpaint_model,
            latent_rgb=meta.latent_rgb or family.latent_rgb,
            slot=slot,
            family=family.name,
            task_list=traits.tasks,
            refiner=traits.refiner,
            base=adapter_file.model_base(folder)[1],
        )


def _kind(entry: ModelEntry) -> str:
    """How an error names a model's kind: its family, and inpainting-only or refiner when it is one."""
    if entry.tasks == (Task.INPAINT,):
        return f"an {entry.family} inpainting model"
    return f"an {entry.family} refiner" if entry.refiner else f"an {entry.family} model"


@dataclasses.dataclass
class LoadedModel:
    """A model's components on the device, shared by the three pipelines."""

    entry: ModelEntry
    components: Components
    choice: DeviceChoice
    load_seconds: float
    latent_rgb_factors: torch.Tensor
    latent_rgb_bias: torch.Tensor
    # Loaded with model CPU offload (see load).
    offloaded: bool = False

    @property
    def name(self) -> str:
        return self.entry.name


def weight_file_bytes(folder: Path) -> int:
    """Bytes of a model folder's safetensors files: what its weights take once loaded (before any dtype change)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file())


def load(entry: ModelEntry, choice: DeviceChoice, policy: MemoryPolicy | None = None) -> LoadedModel:
    """Loads a model's components (safetensors only; int8 variants keep int8 weights on the device, see
    sdserve_core/quant.py) onto the chosen device and dtype; with model CPU offload (sdserve_core.memory.offload:
    the device's free memory cannot hold the model) they stay on the CPU and each moves to the device while it runs."""
    component_classes()  # imported before the clock starts: load_seconds counts the load only
    start = time.perf_counter()
    offloaded = memory.offload(
        policy or MemoryPolicy(),
        device_type=choice.type,
        free_bytes=memory.free_device_bytes(choice.device),
        model_bytes=weight_file_bytes(entry.path),
    )
    components = load_components(entry.path, entry.variant, choice.dtype, "cpu" if offloaded else choice.device)
    if offloaded:
        pipeline.offload(components, choice.device)
        log.info("model loaded with CPU offload", extra={"model": entry.slot})
    factors, bias = entry.latent_rgb
    return LoadedModel(
        entry=entry,
        components=components,
        choice=choice,
        load_seconds=time.perf_counter() - start,
        latent_rgb_factors=torch.tensor(factors, dtype=torch.float32),
        latent_rgb_bias=torch.tensor(bias, dtype=torch.float32),
        offloaded=offloaded,
    )


@dataclasses.dataclass
class _Record:
    """One slot's entry, load state and loaded components."""

    entry: ModelEntry
    state: ModelState = ModelState.ON_DISK
    loaded: LoadedModel | None = None
    error: str = ""
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class ModelRegistry:
    """The models this server knows, with public names, aliases and load state. Thread-safe.

    A slot holds one model folder (its id: the folder name, or NAME@REVISION:VARIANT for stored variants);
    public names map to slots; aliases map to public names or slots. Re-pointing a name or alias is atomic;
    jobs already holding an entry finish on it. Only the model lifecycle (service/lifecycle.py) changes it.
    """

    def __init__(
        self,
        model_dirs: Iterable[Path],
        choice: DeviceChoice,
        aliases: Iterable[tuple[str, str]] = (),
        observer: Observer | None = None,
        memory: MemoryPolicy | None = None,
    ):
        self._memory = memory
        self._dirs = tuple(model_dirs)
        self._choice = choice
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._names: dict[str, str] = {}
        self._aliases: dict[str, str] = {}
        # Canary aliases: each request picks one target by its request id (pick).
        self._weighted: dict[str, Weighted] = {}
        for alias, target in aliases:
            weighted = parse_weighted(target)
            if weighted is None:
                self._aliases[alias] = target
            else:
                self._weighted[alias] = weighted
        self._default = ""
        # Told of each successful load, on the loading thread.
        self._observer = observer or Observer()
        self.rescan()

    @property
    def default(self) -> str:
        """The name or alias that a request naming no model gets ("" until the lifecycle picks it)."""
        with self._lock:
            return self._default

    def set_default(self, name: str) -> None:
        with self._lock:
            self._default = name

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
        """Adds or replaces the slot of `entry` and points `names` (and the slot id itself) at it."""
        with self._lock:
            record = self._records.get(entry.slot)
            if record is None or record.entry.revision != entry.revision or record.entry.path != entry.path:
                self._records[entry.slot] = _Record(entry)
            self._names[entry.slot] = entry.slot
            for name in names:
                self._names[name] = entry.slot

    def remove(self, slot: str) -> None:
        """Forgets a slot and the names pointing at it (its folder is gone)."""
        with self._lock:
            self._records.pop(slot, None)
            for name in [n for n, s in self._names.items() if s == slot]:
                del self._names[name]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._names)

    def aliases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._aliases)

    def weighted_aliases(self) -> dict[str, Weighted]:
        """The canary aliases and their weighted targets."""
        with self._lock:
            return dict(self._weighted)

    def set_alias(self, alias: str, target: str) -> set[str]:
        """Points `alias` at a name or slot; returns the slots it pointed at before."""
        with self._lock:
            before = self._alias_slots(alias)
            self._weighted.pop(alias, None)
            self._aliases[alias] = target
            return before

    def set_weighted(self, alias: str, targets: Weighted) -> set[str]:
        """Makes `alias` a canary alias split between `targets` (names or slots, with weights); returns the slots it
        pointed at before."""
        with self._lock:
            before = self._alias_slots(alias)
            self._aliases.pop(alias, None)
            self._weighted[alias] = targets
            return before

    def remove_alias(self, alias: str) -> set[str]:
        """Forgets `alias`; returns the slots it pointed at."""
        with self._lock:
            before = self._alias_slots(alias)
            self._aliases.pop(alias, None)
            self._weighted.pop(alias, None)
            return before

    def alias_slots(self, alias: str) -> set[str]:
        """The slots an alias points at now (a canary alias: every target's)."""
        with self._lock:
            return self._alias_slots(alias)

    def _alias_slots(self, alias: str) -> set[str]:
        weighted = self._weighted.get(alias)
        names = [t for t, _ in weighted] if weighted is not None else [alias]
        return {slot for n in names if (slot := self._slot_of(n))}

    def _slot_of(self, name: str, key: str = "") -> str | None:
        weighted = self._weighted.get(name)
        if weighted is not None:
            name = pick(weighted, key)
        name = self._aliases.get(name, name)
        return self._names.get(name)

    def slot_of(self, name: str) -> str | None:
        """The slot a name or alias resolves to now, or None."""
        with self._lock:
            return self._slot_of(name)

    def referenced(self) -> set[str]:
        """Slots that an alias or the default points at."""
        with self._lock:
            refs = {self._slot_of(a) for a in self._aliases}
            refs |= {self._slot_of(t) for targets in self._weighted.values() for t, _ in targets}
            if self._default not in self._weighted:
                refs.add(self._slot_of(self._default))
            return {r for r in refs if r}

    def lookup(self, requested: str, task: Task, key: str = "") -> ModelEntry:
        """Name or alias (empty: the default) to the entry that serves `task` (an inpainting companion for
        Inpaint when the model names one). A canary alias picks its target by `key` (the request id)."""
        name = requested or self._default
        with self._lock:
            entry = self._entry_of(name, key)
            if entry is None:
                weighted = self._weighted.get(name)
                raise ModelNotFound(pick(weighted, key) if weighted else name)
            if task not in entry.tasks:
                raise ModelUnusable(f"model {name!r} ({_kind(entry)}) cannot run {task.value}")
            if task is Task.INPAINT and entry.unet_in_channels == 4 and entry.inpaint_model:
                companion = self._entry_of(entry.inpaint_model)
                if companion is not None:
                    return companion
            return entry

    def lookup_refiner(self, name: str) -> ModelEntry:
        """The entry of the model a request names as its refiner: NOT_FOUND naming params.refiner.model when there
        is none, FAILED_PRECONDITION when it is not an SDXL model that can run Edit."""
        with self._lock:
            entry = self._entry_of(name)
        if entry is None:
            raise ModelNotFound(name, field="params.refiner.model")
        if entry.family != "sdxl" or Task.EDIT not in entry.tasks:
            raise ModelUnusable(
                f"params.refiner.model: model {name!r} ({_kind(entry)}) cannot refine; a refiner is an SDXL model that "
                "runs Edit"
            )
        return entry

    def _entry_of(self, name: str, key: str = "") -> ModelEntry | None:
        slot = self._slot_of(name, key)
        record = self._records.get(slot) if slot else None
        return record.entry if record is not None else None

    def entry_of(self, name: str) -> ModelEntry | None:
        """The entry a name or alias (empty: the default) points at now, or None."""
        with self._lock:
            return self._entry_of(name or self._default)

    def state(self, slot: str) -> tuple[ModelState, str]:
        with self._lock:
            record = self._records[slot]
            return record.state, record.error

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [r.entry for _, r in sorted(self._records.items())]

    def offloaded(self) -> list[str]:
        """Slots loaded with model CPU offload."""
        with self._lock:
            records = list(self._records.items())
        return sorted(slot for slot, r in records if r.loaded is not None and r.loaded.offloaded)

    def public_names(self, slot: str) -> list[str]:
        """Names (not aliases) that point at a slot."""
        with self._lock:
            return sorted(n for n, s in self._names.items() if s == slot and n != slot)

    def unload(self, slot: str) -> bool:
        """Drops the slot's loaded components; jobs still holding them finish first (refcounts)."""
        with self._lock:
            record = self._records.get(slot)
        if record is None:
            return False
        with record.lock:
            was = record.loaded is not None
            record.loaded = None
            if record.state is ModelState.LOADED:
                record.state = ModelState.ON_DISK
        return was

    def get_loaded(self, entry: ModelEntry) -> LoadedModel:
        """The loaded model for `entry`, loading it first if needed (its files verified against the manifest)."""
        with self._lock:
            record = self._records.get(entry.slot)
            if record is None or record.entry.revision != entry.revision:
                raise ModelUnusable(f"model {entry.name!r} revision {entry.revision} is no longer available")
        with record.lock:
            if record.loaded is None:
                record.loaded = self._load(record)
            return record.loaded

    def _load(self, record: _Record) -> LoadedModel:
        """Verifies and loads a slot's model (its lock held); a failure leaves the slot FAILED with the reason."""
        entry = record.entry
        # Nothing is loaded unless its files match the sidecar's manifest (digests cached by stat).
        problems = verify_folder(entry.path)
        if problems:
            record.state = ModelState.FAILED
            record.error = f"files do not match manifest.json: {problems[0]}"
            log.error("model refused", extra={"model": entry.slot, "problems": problems})
            raise ModelUnusable(f"model {entry.name!r} cannot be loaded: its {record.error}")
        record.state = ModelState.LOADING
        try:
            loaded = load(entry, self._choice, self._memory)
        except Exception as exc:
            record.state = ModelState.FAILED
            record.error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed", extra={"model": entry.slot})
            raise ModelUnusable(f"model {entry.name!r} failed to load") from exc
        record.state = ModelState.LOADED
        record.error = ""
        self._observer.model_loaded(entry, loaded.load_seconds)
        log.info(
            "model loaded", extra={"model": entry.slot, "revision": entry.revision, "seconds": loaded.load_seconds}
        )
        return loaded
