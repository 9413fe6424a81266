"""What the A1111 listing endpoints answer, from the servicer's ListModels and GetServerInfo answers."""

from __future__ import annotations

import re
from typing import Any

from sdserve.v1 import diffusion_pb2 as pb
from service.a1111 import samplers

_TITLE_HASH = re.compile(r"\s*\[[0-9A-Za-z]+\]\s*$")
_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".bin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The options GET /sdapi/v1/options reports besides the checkpoint: what this server does, in A1111's terms.
FIXED_OPTIONS: dict[str, Any] = {
    "CLIP_stop_at_last_layers": 1,
    "sd_vae": "Automatic",
    "samples_format": "png",
    "enable_pnginfo": True,
    "eta_noise_seed_delta": 0,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_noise": 1.0,
    "initial_noise_multiplier": 1.0,
    "img2img_background_color": "#ffffff",
    "live_previews_enable": True,
    "show_progress_every_n_steps": 1,
    "show_progress_type": "Approx cheap",
    "live_preview_content": "Prompt",
    "randn_source": "CPU",
}


def short_hash(revision: str) -> str:
    """A1111's 10-character model hash: the first 10 characters of the revision (what sdserve's infotext writes)."""
    return revision[:10]


def title(model: pb.ModelInfo) -> str:
    """A1111's checkpoint title, `name [hash]`."""
    return f"{model.name} [{short_hash(model.revision)}]"


def checkpoint_name(value: str) -> str:
    """The model name or alias in an A1111 checkpoint reference: a title `name [hash]`, a file name
    `name.safetensors`, or a plain name."""
    name = _TITLE_HASH.sub("", value.strip())
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def sd_models(models: pb.ListModelsResponse) -> list[dict[str, Any]]:
    """GET /sdapi/v1/sd-models: every model; `filename` is the model's name (no server paths are shown)."""
    return [
        {
            "title": title(m),
            "model_name": m.name,
            "hash": short_hash(m.revision),
            "sha256": m.revision if _SHA256.match(m.revision) else None,
            "filename": m.name,
            "config": None,
        }
        for m in models.models
    ]


def default_model(models: pb.ListModelsResponse) -> pb.ModelInfo | None:
    """The model the server's default name or alias points at."""
    for m in models.models:
        if models.default_model == m.name or models.default_model in m.aliases:
            return m
    return None


def offered(info: pb.GetServerInfoResponse) -> list[samplers.Sampler]:
    """The samplers whose schedulers this server offers."""
    return samplers.offered([pb.Scheduler.Name(s).removeprefix("SCHEDULER_") for s in info.schedulers])


def sampler_items(info: pb.GetServerInfoResponse) -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers."""
    items = []
    for s in offered(info):
        options: dict[str, Any] = {"scheduler": "karras"} if s.scheduler == s.karras else {}
        if s.eta is not None:
            options["eta"] = s.eta
        items.append({"name": s.name, "aliases": list(s.aliases), "options": options})
    return items


def scheduler_items() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: the schedule types some sampler here takes."""
    rows: tuple[tuple[str, str, float, bool], ...] = (
        ("automatic", samplers.AUTOMATIC, -1, False),
        ("uniform", samplers.UNIFORM, -1, True),
        ("karras", samplers.KARRAS, 7.0, False),
    )
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": inner}
        for name, label, rho, inner in rows
    ]


def options(models: pb.ListModelsResponse) -> dict[str, Any]:
    """GET /sdapi/v1/options: the default checkpoint plus FIXED_OPTIONS."""
    default = default_model(models)
    checkpoint = title(default) if default is not None else models.default_model
    sha = default.revision if default is not None and _SHA256.match(default.revision) else None
    return {"sd_model_checkpoint": checkpoint, "sd_checkpoint_hash": sha, **FIXED_OPTIONS}


def loras(info: pb.GetServerInfoResponse) -> list[dict[str, Any]]:
    """GET /sdapi/v1/loras (the Lora extension's listing): the LoRA adapters `<lora:NAME:W>` may name."""
    return [
        {"name": a.name, "alias": a.name, "path": "", "metadata": {"family": a.family, "sha256": a.sha256}}
        for a in info.adapters
        if a.kind == pb.ADAPTER_KIND_LORA
    ]
