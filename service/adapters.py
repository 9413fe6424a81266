"""Adapters: the catalog of those on disk (LoRAs and textual-inversion embeddings, in the folder format of
sdserve_core.adapter_file), their resolution against a request's model, and the pool of LoRAs loaded into models
(an LRU bounded in bytes)."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from sdserve_core import adapter_file
from sdserve_core.adapter_file import LORA, TEXTUAL_INVERSION, AdapterFormatError, Manifest
from sdserve_core.components import CONSTRUCTION_LOCK
from sdserve_core.status import FieldViolation
from sdserve_core.weighted import TokenEmbedding
from service.errors import InvalidRequest, ServiceError
from service.observers import Observer
from service.requests import AdapterUse, GenerationRequest, Outcome

log = logging.getLogger(__name__)


class AdapterNotFound(ServiceError, LookupError):
    """No adapter has this name."""

    outcome = Outcome.NOT_FOUND

    def __init__(self, name: str, field: str):
        message = f"{field}: adapter {name!r} not found; GetServerInfo lists the adapters this server has"
        super().__init__(message, (FieldViolation(field, f"adapter {name!r} not found"),))


class AdapterUnusable(ServiceError):
    """The adapter exists but cannot serve this request (another family or base, or its file is bad)."""

    outcome = Outcome.FAILED_PRECONDITION

    def __init__(self, message: str, field: str = ""):
        super().__init__(message, (FieldViolation(field, message),) if field else ())


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """An adapter folder on disk: its name (the folder's), weights file and manifest."""

    name: str
    folder: Path
    manifest: Manifest

    @property
    def weights(self) -> Path:
        return self.folder / adapter_file.WEIGHTS

    @property
    def kind(self) -> str:
        return self.manifest.file.kind

    @property
    def token(self) -> str:
        return self.manifest.file.token


def read_entry(folder: Path) -> AdapterEntry:
    """An adapter folder's entry: its adapter.json, or (for a folder someone copied in without one) what its weights
    file says, hashed now. Raises AdapterFormatError, OSError or ValueError for a bad folder."""
    weights = folder / adapter_file.WEIGHTS
    if (folder / adapter_file.MANIFEST).is_file():
        manifest = adapter_file.read_manifest(folder)
    else:
        manifest = adapter_file.describe(weights, folder.name, source=f"folder {folder.name}")
    if not weights.is_file():
        raise AdapterFormatError(f"{folder.name}: no {adapter_file.WEIGHTS}")
    return AdapterEntry(folder.name, folder, manifest)


class AdapterCatalog:
    """The adapters in a list of folders (each holding adapter folders; the first folder holding a name wins),
    re-read whenever one of the folders changes (a published or removed adapter renames a folder in or out)."""

    def __init__(self, dirs: Sequence[Path] = ()):
        self._dirs: list[Path] = list(dirs)
        self._entries: dict[str, AdapterEntry] = {}
        self._seen: tuple[tuple[str, int], ...] | None = None
        self._lock = threading.Lock()

    def add_dir(self, folder: Path) -> None:
        """Also reads adapters from `folder` (the model manager's store, once the sidecar names it)."""
        with self._lock:
            if folder not in self._dirs:
                self._dirs.append(folder)
                self._seen = None

    def _signature(self) -> tuple[tuple[str, int], ...]:
        out = []
        for d in self._dirs:
            try:
                out.append((str(d), d.stat().st_mtime_ns))
            except OSError:
                out.append((str(d), -1))
        return tuple(out)

    def _refresh(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        found: dict[str, AdapterEntry] = {}
        for root in self._dirs:
            if not root.is_dir():
                continue
            for folder in sorted(root.iterdir()):
                if folder.name in found or folder.name.startswith(".") or not folder.is_dir():
                    continue
                try:
                    found[folder.name] = read_entry(folder)
                except (AdapterFormatError, OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("skipping adapter folder", extra={"folder": str(folder), "error": str(exc)})
        self._entries, self._seen = found, signature

    def get(self, name: str) -> AdapterEntry | None:
        with self._lock:
            self._refresh()
            return self._entries.get(name)

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            self._refresh()
            return [self._entries[n] for n in sorted(self._entries)]


def _use(entry: AdapterEntry, scale: float) -> AdapterUse:
    m = entry.manifest
    return AdapterUse(entry.name, m.file.kind, scale, m.sha256, m.file.token, m.file.targets, entry.weights)


def _prompt_texts(req: GenerationRequest) -> tuple[str, ...]:
    return (req.prompt, req.negative_prompt, req.prompt_2, req.negative_prompt_2)


def _mentioned(token: str, texts: Sequence[str]) -> bool:
    """Whether a prompt uses the token, by the rule the encoder replaces it by (sdserve_core.weighted)."""
    from sdserve_core import weighted

    table = {token: _NO_VECTORS}
    return any(weighted.mentions(t, table) for t in texts)


_NO_VECTORS = TokenEmbedding({})


def resolve(
    catalog: AdapterCatalog, req: GenerationRequest, family: str, base: str, variant: str = ""
) -> tuple[AdapterUse, ...]:
    """The adapters that serve `req` on a model of `family`, `base` and stored `variant`, sorted by name: the LoRAs
    it names, and the embeddings (of that family and base) whose tokens its prompts use. Raises AdapterNotFound,
    InvalidRequest (an embedding named as a LoRA) or AdapterUnusable (another family or base; a LoRA on int8
    weights), each naming the field."""
    uses: list[AdapterUse] = []
    for ref in req.adapters:
        entry = catalog.get(ref.name)
        if entry is None:
            raise AdapterNotFound(ref.name, ref.field)
        if entry.kind != LORA:
            rule = f"adapter {ref.name!r} is a textual-inversion embedding: use its token {entry.token!r} in the prompt"
            raise InvalidRequest([FieldViolation(ref.field, rule)])
        reason = adapter_file.fits(entry.manifest.file, family, base)
        if reason is None and variant == "int8":
            reason = "LoRAs apply to float weights; this model is the int8 variant (use its fp32/fp16 variant)"
        if reason is not None:
            raise AdapterUnusable(f"{ref.field}: adapter {ref.name!r}: {reason}", ref.field)
        uses.append(_use(entry, ref.scale))
    texts = _prompt_texts(req)
    for entry in catalog.entries():
        if entry.kind != TEXTUAL_INVERSION or not entry.token or not _mentioned(entry.token, texts):
            continue
        if adapter_file.fits(entry.manifest.file, family, base) is None:
            uses.append(_use(entry, 1.0))
    return tuple(sorted(uses, key=lambda u: u.name))


@dataclasses.dataclass
class _Loaded:
    components: weakref.ref[object]
    model: str
    name: str
    nbytes: int


class AdapterPool:
    """LoRAs loaded into models' components, least recently used first, bounded in bytes: a LoRA is read, verified
    against its sha256 and loaded on first use by a model, and unloaded again when the bound needs room (never one
    the current batch uses). Only the device worker's thread calls prepare (loading changes the shared modules)."""

    def __init__(self, max_bytes: int, observer: Observer | None = None):
        self.max_bytes = max_bytes
        self._observer = observer or Observer()
        self._items: collections.OrderedDict[tuple[int, str], _Loaded] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def prepare(self, components: object, model: str, uses: Sequence[AdapterUse]) -> list[tuple[str, float]]:
        """Loads the LoRAs of `uses` into `components` (of `model`) where they are not yet; returns the loaded names
        and scales to activate (sdserve_core.pipeline.adapters.lora_active)."""
        active: list[tuple[str, float]] = []
        keep = set()
        for use in uses:
            if not use.lora:
                continue
            key = (id(components), use.sha256)
            keep.add(key)
            self._ensure(key, components, model, use)
            active.append((peft_name(use), use.scale))
        self._evict(keep)
        return active

    def _ensure(self, key: tuple[int, str], components: object, model: str, use: AdapterUse) -> None:
        with self._lock:
            found = self._items.get(key)
            if found is not None and found.components() is components:
                self._items.move_to_end(key)
                hit = True
            else:
                hit = False
                if found is not None:  # a dead model's entry whose id was reused
                    self._forget(key)
        self._observer.adapter_lookup(hit)
        if hit:
            return
        nbytes = _load(components, use)
        with self._lock:
            self._items[key] = _Loaded(weakref.ref(components), model, use.name, nbytes)
            self._bytes += nbytes
        self._report()

    def _forget(self, key: tuple[int, str]) -> _Loaded:
        item = self._items.pop(key)
        self._bytes -= item.nbytes
        return item

    def _evict(self, keep: set[tuple[int, str]]) -> None:
        from sdserve_core.pipeline import adapters as runtime

        while True:
            with self._lock:
                dead = [k for k, v in self._items.items() if v.components() is None]
                for k in dead:
                    self._forget(k)
                over = [k for k in self._items if k not in keep]
                if self._bytes <= self.max_bytes or not over:
                    break
                key = over[0]
                item = self._forget(key)
            components = item.components()
            if components is not None:
                runtime.unload_lora(components, "sd_" + key[1][:16])  # type: ignore[arg-type]
            self._observer.adapter_evicted()
        self._report()

    def loaded_in(self) -> dict[str, list[str]]:
        """Adapter name -> names of the models that hold it in memory now."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for item in self._items.values():
                if item.components() is not None:
                    out.setdefault(item.name, []).append(item.model)
        return {k: sorted(set(v)) for k, v in out.items()}

    def _report(self) -> None:
        self._observer.adapter_cache(self._bytes, len(self._items))


def peft_name(use: AdapterUse) -> str:
    """The name a LoRA is loaded under in a model's peft layers: from its content, so a replaced file is a new one."""
    return "sd_" + use.sha256[:16]


def _load(components: object, use: AdapterUse) -> int:
    """Verifies the LoRA file against its recorded sha256 and loads it (inactive); returns its bytes in memory."""
    from sdserve_core.pipeline import adapters as runtime

    started = time.perf_counter()
    try:
        actual = adapter_file.sha256_file(use.weights)
    except OSError as exc:
        raise AdapterUnusable(f"adapter {use.name!r}: its file cannot be read ({exc})") from exc
    if actual != use.sha256:
        raise AdapterUnusable(
            f"adapter {use.name!r}: its file's sha256 {actual[:12]}... is not the recorded {use.sha256[:12]}... "
            "(corrupt or replaced in place); import it again"
        )
    try:
        # peft builds the LoRA layers: never while another thread's load has patched module construction.
        with CONSTRUCTION_LOCK:
            nbytes = runtime.load_lora(components, peft_name(use), use.weights)  # type: ignore[arg-type]
    except runtime.AdapterLoadError as exc:
        raise AdapterUnusable(f"adapter {use.name!r}: {exc}") from exc
    log.info("adapter loaded", extra={"adapter": use.name, "seconds": round(time.perf_counter() - started, 3)})
    return nbytes


_EMBEDDINGS: dict[str, TokenEmbedding] = {}
_EMBEDDINGS_LOCK = threading.Lock()
# SDXL embeddings' tensors by text encoder (A1111 / diffusers SDXL layout).
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def embedding(use: AdapterUse) -> TokenEmbedding:
    """A textual-inversion embedding's vectors per text encoder (CPU, float32; cached by sha256). Its file is
    verified against the recorded sha256 when first read; AdapterUnusable when it does not match or is not one."""
    with _EMBEDDINGS_LOCK:
        found = _EMBEDDINGS.get(use.sha256)
    if found is not None:
        return found
    try:
        data = use.weights.read_bytes()
    except OSError as exc:
        raise AdapterUnusable(f"adapter {use.name!r}: its file cannot be read ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != use.sha256:
        raise AdapterUnusable(f"adapter {use.name!r}: its file does not match its recorded sha256; import it again")
    from safetensors.torch import load

    tensors = load(data)
    if set(tensors) & set(_SDXL_KEYS):
        vectors = {_SDXL_KEYS[k]: t.float() for k, t in tensors.items() if k in _SDXL_KEYS}
    elif len(tensors) == 1:
        vectors = {"text_encoder": next(iter(tensors.values())).float()}
    else:
        raise AdapterUnusable(f"adapter {use.name!r}: not a textual-inversion file (keys {sorted(tensors)[:4]})")
    made = TokenEmbedding(vectors)
    with _EMBEDDINGS_LOCK:
        _EMBEDDINGS[use.sha256] = made
    return made


def vocab(uses: Sequence[AdapterUse]) -> dict[str, TokenEmbedding]:
    """Token -> vectors of the embeddings among `uses` (for the family's encode_prompt)."""
    return {u.token: embedding(u) for u in uses if not u.lora}
