"""Adapter files (LoRA and textual-inversion embeddings): what a .safetensors file holds, read from its header alone.

No torch and no pickle: a safetensors file starts with an 8-byte little-endian header length and a JSON header that
gives every tensor's dtype and shape, which is all this module reads. The model manager stores adapters with it, the
server checks that an adapter fits a model with `fits`, and the tests and training code build files in every layout.

Layouts (`AdapterFile.layout`):

* LoRA `diffusers`: keys `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older `.lora.down.weight` /
  `.lora.up.weight`, `.lora_linear_layer.down.weight`), `text_encoder.<module>...`, `text_encoder_2.<module>...`.
* LoRA `peft`: the same without the component prefix (`<module>.lora_A.weight`, optionally under
  `base_model.model.`); `text_model.*` modules are the text encoder, everything else the UNet.
* LoRA `kohya` (kohya-ss / A1111): `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_*` (SD 1.x/2.x) or `lora_te1_*` / `lora_te2_*` (SDXL).
* textual inversion `diffusers`: one tensor `{token: [n, dim]}`; `a1111`: `{"emb_params": [n, dim]}`;
  `sdxl`: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sdserve_core import family_index, manifest

WEIGHTS = "adapter.safetensors"
MANIFEST = "adapter.json"
LORA = "lora"
TEXTUAL_INVERSION = "textual_inversion"
KINDS = (LORA, TEXTUAL_INVERSION)
TARGETS = ("text_encoder", "text_encoder_2", "unet")
PICKLE_RULE = "only .safetensors; pickle formats are refused"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
BASE_KEYS = ("cross_attention_dim", "text_width", "text_width_2")
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
# LoRA key suffixes: (suffix, role) with role "down", "up" or "alpha".
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))
_SGM_BLOCKS = re.compile(r"(^|[._])(input_blocks|middle_block|output_blocks)[._]")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks[._](\d+)")
_TOKEN_MAX = 100


class AdapterFormatError(ValueError):
    """A file that is not a usable adapter; the message names the file and the rule it breaks."""


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """What an adapter file is: kind, layout, the family and base architecture it fits, the components it changes,
    its token (textual inversion; "" for a LoRA) and its size in bytes."""

    kind: str
    layout: str
    family: str
    base: str
    targets: tuple[str, ...]
    token: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """adapter.json: the adapter's name, the sha256 of adapter.safetensors, where it came from, and what it is."""

    name: str
    sha256: str
    source: str
    file: AdapterFile

    def to_dict(self) -> dict[str, Any]:
        f = self.file
        return {
            "name": self.name,
            "kind": f.kind,
            "layout": f.layout,
            "family": f.family,
            "base": f.base,
            "targets": list(f.targets),
            "token": f.token,
            "sha256": self.sha256,
            "size_bytes": f.size_bytes,
            "source": self.source,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Manifest:
        """Raises KeyError, TypeError or ValueError for a malformed dict."""
        targets = data["targets"]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("targets must be a list of strings")
        text = {k: data[k] for k in ("name", "kind", "layout", "family", "base", "token", "sha256", "source")}
        if not all(isinstance(v, str) for v in text.values()) or text["kind"] not in KINDS:
            raise ValueError("name, kind, layout, family, base, token, sha256 and source must be strings")
        size = data["size_bytes"]
        if not isinstance(size, int) or size < 0:
            raise ValueError("size_bytes must be a non-negative integer")
        f = AdapterFile(text["kind"], text["layout"], text["family"], text["base"], tuple(targets), text["token"], size)
        return Manifest(text["name"], text["sha256"], text["source"], f)


# ---- reading a safetensors header ---------------------------------------------------------------------------------


def refuse_pickle(path: Path) -> None:
    """Raises AdapterFormatError for a pickle-format name (.pt, .ckpt, .bin, ...) or any file that starts like a zip
    archive or a raw pickle, and for any name not ending in .safetensors."""
    if path.name.lower().endswith(PICKLE_SUFFIXES) or not path.name.endswith(".safetensors"):
        raise AdapterFormatError(f"{path.name}: {PICKLE_RULE}")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise AdapterFormatError(f"{path.name}: starts like a pickle or zip archive; {PICKLE_RULE}")


def read_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from the file's safetensors header, checked against the file's size."""
    size = path.stat().st_size
    bad = f"{path.name}: not a valid safetensors file"
    if size < 8:
        raise AdapterFormatError(f"{bad} ({size} bytes is too short)")
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > _MAX_HEADER or 8 + length > size:
            raise AdapterFormatError(f"{bad} (header length {length}, file {size} bytes)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError):
            raise AdapterFormatError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{bad} (its header is not an object)")
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            count = 1
            for dim in shape:
                count *= dim
            if not 0 <= begin <= end or end - begin != count * _DTYPE_BYTES[info["dtype"]]:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{bad} (tensor {key!r} has a malformed entry)") from None
        shapes[key] = (str(info["dtype"]), shape)
        end_max = max(end_max, end)
    if end_max != size - 8 - length:
        raise AdapterFormatError(
            f"{bad} (its header describes {end_max} bytes of data, the file has {size - 8 - length})"
        )
    return shapes


# ---- classification -----------------------------------------------------------------------------------------------


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Lower-case hex sha256 of the file's bytes (sdserve_core.manifest's, as models are hashed)."""
    return manifest.sha256_file(path, on_bytes)


def token_problem(token: str) -> str | None:
    """Why `token` cannot be a textual-inversion token; None when it can."""
    if not token:
        return "is required"
    if len(token) > _TOKEN_MAX or any(ch.isspace() or ord(ch) < 32 for ch in token):
        return f"must be 1 to {_TOKEN_MAX} characters without spaces or control characters"
    return None


def _width(path: Path, key: str, shape: tuple[int, ...]) -> int:
    if len(shape) not in (1, 2) or shape[-1] <= 0:
        raise AdapterFormatError(f"{path.name}: embedding {key!r} has shape {list(shape)}; expected [vectors, width]")
    return shape[-1]


def _textual_inversion(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]], token: str) -> AdapterFile | None:
    """The AdapterFile of a textual-inversion file, or None when the keys are not a textual-inversion layout."""
    keys = set(shapes)
    size = path.stat().st_size
    if keys == {"clip_l", "clip_g"}:
        w1, w2 = _width(path, "clip_l", shapes["clip_l"][1]), _width(path, "clip_g", shapes["clip_g"][1])
        base = f"text_width={w1},text_width_2={w2}"
        return AdapterFile(TEXTUAL_INVERSION, "sdxl", family_index.SDXL, base, TARGETS[:2], token, size)
    if len(keys) != 1:
        return None
    (key,) = keys
    if "." in key or key.startswith(("lora_", "base_model")):
        return None
    width = _width(path, key, shapes[key][1])
    layout = "a1111" if key == "emb_params" else "diffusers"
    token = token or ("" if layout == "a1111" else key)
    return AdapterFile(TEXTUAL_INVERSION, layout, family_index.SD15, f"text_width={width}", TARGETS[:1], token, size)


def _split_diffusers(key: str) -> tuple[str, str, str, str] | None:
    """(layout, target, module, role) of a diffusers- or peft-layout LoRA key; None when it is neither."""
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if not key.endswith(suffix):
            continue
        module = key[: -len(suffix)]
        for target in ("text_encoder_2", "text_encoder", "unet"):
            if module.startswith(target + "."):
                return "diffusers", target, module[len(target) + 1 :], role
        module = module.removeprefix("base_model.model.")
        return "peft", "text_encoder" if module.startswith("text_model.") else "unet", module, role
    return None


def _split_kohya(key: str) -> tuple[str, str, str, str] | None:
    """('kohya', target, module, role) of a kohya-layout LoRA key; None when it is not one."""
    for suffix, role in _KOHYA_SUFFIXES:
        if not key.endswith(suffix):
            continue
        module = key[: -len(suffix)]
        if module.startswith("lora_te_"):
            return "kohya", "text_encoder", module[len("lora_te_") :], role
        for prefix, target in _KOHYA_PREFIXES:
            if module.startswith(prefix):
                return "kohya", target, module[len(prefix) :], role
    return None


def _in_features(entries: list[tuple[str, str, str, tuple[int, ...]]], target: str, names: tuple[str, ...]) -> int:
    """In-features of the first LoRA down matrix of `target` whose module name contains one of `names`; 0: none."""
    for name in names:
        for t, module, role, shape in entries:
            flat = module.replace(".", "_")
            if t == target and role == "down" and len(shape) >= 2 and name in flat:
                return shape[1]
    return 0


def _lora(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> AdapterFile:
    """The AdapterFile of a LoRA file in one of the diffusers, peft and kohya layouts."""
    entries: list[tuple[str, str, str, tuple[int, ...]]] = []
    layouts: dict[str, str] = {}
    for key in sorted(shapes):
        split = _split_kohya(key) if key.startswith("lora_") else _split_diffusers(key)
        if split is None:
            raise AdapterFormatError(
                f"{path.name}: tensor {key!r} is not a LoRA weight in the diffusers, peft or kohya layout, nor a "
                "textual-inversion embedding (no recognisable keys)"
            )
        layout, target, module, role = split
        layouts.setdefault(layout, key)
        entries.append((target, module, role, shapes[key][1]))
    if len(layouts) > 1:
        shown = ", ".join(f"{k} ({layout})" for layout, k in sorted(layouts.items()))
        raise AdapterFormatError(f"{path.name}: mixed layouts ({shown}); an adapter file holds one layout")
    if not any(role == "down" for _, _, role, _ in entries):
        raise AdapterFormatError(f"{path.name}: no LoRA down matrices (no recognisable keys)")
    widths = {
        "cross_attention_dim": _in_features(entries, "unet", ("attn2_to_k", "attn2_to_v")),
        "text_width": _in_features(entries, "text_encoder", ("q_proj", "k_proj", "v_proj", "fc1")),
        "text_width_2": _in_features(entries, "text_encoder_2", ("q_proj", "k_proj", "v_proj", "fc1")),
    }
    base = ",".join(f"{k}={v}" for k, v in widths.items() if v)
    targets = tuple(sorted({t for t, _, _, _ in entries}))
    modules = [m for t, m, _, _ in entries if t == "unet"]
    sdxl = (
        "text_encoder_2" in targets
        or widths["cross_attention_dim"] in (2048, 1280)
        or any(_SGM_BLOCKS.search(m) for m in modules)
        or any(int(n) > 0 for m in modules for n in _TRANSFORMER_BLOCK.findall(m))
    )
    family = family_index.SDXL if sdxl else family_index.SD15
    return AdapterFile(LORA, next(iter(layouts)), family, base, targets, "", path.stat().st_size)


def inspect(path: Path, token: str = "") -> AdapterFile:
    """What the adapter file `path` is, from its safetensors header. `token`: a textual inversion's token (default:
    the tensor's name in the diffusers layout; required by the caller for a1111 and sdxl files). Raises
    AdapterFormatError naming the file and the rule it breaks: pickle formats, invalid safetensors, unrecognised
    keys, mixed layouts."""
    path = Path(path)
    refuse_pickle(path)
    shapes = read_shapes(path)
    if not shapes:
        raise AdapterFormatError(f"{path.name}: holds no tensors (no recognisable keys)")
    ti = _textual_inversion(path, shapes, token)
    return ti if ti is not None else _lora(path, shapes)


# ---- manifest ----------------------------------------------------------------------------------------------------


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Writes `folder`/adapter.json (through a temporary file, fsynced and renamed)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        json.dump(manifest.to_dict(), fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> Manifest:
    """The adapter.json of `folder`; AdapterFormatError when it is missing or malformed."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: missing (every stored adapter has one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: not readable JSON ({exc})") from None
    try:
        if not isinstance(data, dict):
            raise TypeError("not an object")
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None


def describe(weights: Path, name: str, source: str, token: str = "") -> Manifest:
    """The manifest of the adapter file `weights` stored as `name`: inspect (a textual inversion's token defaults to
    the diffusers tensor name, else to `name`) and sha256."""
    file = inspect(weights, token)
    if file.kind == TEXTUAL_INVERSION and not file.token:
        file = dataclasses.replace(file, token=name)
    return Manifest(name, sha256_file(weights), source, file)


# ---- fitting a model ----------------------------------------------------------------------------------------------


def _config_int(path: Path, key: str) -> int:
    value = family_index.read_json(path).get(key, 0)
    if isinstance(value, list):  # a per-block list; the blocks share one width in every SD family
        value = value[0] if value else 0
    return int(value) if isinstance(value, int) else 0


def model_base(model_folder: Path) -> tuple[str, str]:
    """(family, base) of a diffusers model folder from its configs (no weights read); base is
    `cross_attention_dim=N,text_width=W[,text_width_2=W2]`, leaving out encoders the folder lacks (an SDXL refiner
    has no text_encoder)."""
    folder = Path(model_folder)
    values = {
        "cross_attention_dim": _config_int(folder / "unet" / "config.json", "cross_attention_dim"),
        "text_width": _config_int(folder / "text_encoder" / "config.json", "hidden_size"),
        "text_width_2": _config_int(folder / "text_encoder_2" / "config.json", "hidden_size"),
    }
    return family_index.family_name(folder), ",".join(f"{k}={v}" for k, v in values.items() if v)


def parse_base(base: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}."""
    out: dict[str, str] = {}
    for part in base.split(","):
        if part:
            key, _, value = part.partition("=")
            out[key] = value
    return out


def fits(adapter: AdapterFile, family: str, base: str) -> str | None:
    """None when the adapter fits a model of `family` and `base` (as model_base gives them): the same family, and
    every key of the adapter's base equal to the model's. Otherwise the reason, naming both."""
    mine, theirs = parse_base(adapter.base), parse_base(base)
    wrong = adapter.family != family or any(theirs.get(k) != v for k, v in mine.items())
    if not wrong:
        return None
    return f"adapter family {adapter.family} ({adapter.base or 'no base'}) does not fit model family {family} ({base})"


# ---- kohya key names ---------------------------------------------------------------------------------------------


def to_kohya_keys(keys: Iterable[str]) -> dict[str, str]:
    """{diffusers-layout key: kohya-layout key} for LoRA weight names (names only, no tensors):
    `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` ->
    `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`; `text_encoder.` becomes
    `lora_te_` (or `lora_te1_` when the keys also have `text_encoder_2.`, which becomes `lora_te2_`). Add an `.alpha`
    per module (kohya_alpha_keys) equal to the rank to keep diffusers' scale of 1."""
    keys = list(keys)
    sdxl = any(k.startswith("text_encoder_2.") for k in keys)
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    out: dict[str, str] = {}
    for key in keys:
        split = _split_diffusers(key)
        if split is None or split[0] != "diffusers" or split[3] == "alpha":
            raise ValueError(f"{key!r} is not a diffusers-layout LoRA weight name")
        _, target, module, role = split
        out[key] = prefixes[target] + module.replace(".", "_") + f".lora_{role}.weight"
    return out


def kohya_alpha_keys(kohya_keys: Iterable[str]) -> list[str]:
    """The `<module>.alpha` names of the modules of kohya-layout weight names, sorted."""
    return sorted({k.rsplit(".lora_", 1)[0] + ".alpha" for k in kohya_keys})
