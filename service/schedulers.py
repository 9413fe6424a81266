"""Builds a fresh scheduler per request from the model's scheduler config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "DDPM": ("DDPMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "EULER": ("EulerDiscreteScheduler", {}),
    "EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "HEUN": ("HeunDiscreteScheduler", {}),
    "DPMPP_2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPMPP_2M_KARRAS": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "UNIPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}

# Keys that belong to one scheduler family and confuse another when carried over.
_DROP = ("_class_name", "_diffusers_version", "skip_prk_steps", "use_karras_sigmas", "algorithm_type", "solver_order")


def native_name(config: Mapping[str, Any]) -> str:
    """The SCHEDULERS name matching a model's own scheduler config (DDIM when unknown)."""
    cls = str(config.get("_class_name", ""))
    for name, (cls_name, overrides) in SCHEDULERS.items():
        if cls_name == cls and all(config.get(k) == v for k, v in overrides.items() if k != "skip_prk_steps"):
            return name
    return "DDIM"


def build(name: str, config: Mapping[str, Any]) -> Any:
    """A new scheduler instance; `name` is a SCHEDULERS key or "" for the model's own class."""
    if not name:
        cls = getattr(diffusers, str(config["_class_name"]))
        return cls.from_config(dict(config))
    cls_name, overrides = SCHEDULERS[name]
    base = {k: v for k, v in config.items() if k not in _DROP}
    base.update(overrides)
    return getattr(diffusers, cls_name).from_config(base)


def class_name(name: str, config: Mapping[str, Any]) -> str:
    """The diffusers class a scheduler name builds."""
    return str(config["_class_name"]) if not name else SCHEDULERS[name][0]


def max_steps(name: str, config: Mapping[str, Any]) -> int:
    """The most denoising steps the scheduler accepts for a model: its training timesteps, and for LCM the
    distillation schedule's length (`original_inference_steps`, 50 unless the config says otherwise). With
    "leading" spacing the schedule is shifted up by `steps_offset`, so one step per training timestep would reach
    timestep `num_train_timesteps`, past the end of the noise schedule (DDIM, PNDM and DDPM index it): the limit is
    lower by the offset."""
    limit = int(config.get("num_train_timesteps", 1000))
    if config.get("timestep_spacing", "leading") == "leading":
        limit -= int(config.get("steps_offset", 0))
    if class_name(name, config) == "LCMScheduler":
        limit = min(limit, int(config.get("original_inference_steps", 50)))
    return limit
