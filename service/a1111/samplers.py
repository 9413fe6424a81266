"""A1111 sampler and schedule-type names mapped onto the contract's Scheduler values, and back."""

from __future__ import annotations

import dataclasses

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.status import FieldViolation

AUTOMATIC, UNIFORM, KARRAS = "Automatic", "Uniform", "Karras"


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One A1111 sampler as sdserve runs it.

    `scheduler` is the contract's scheduler (without the `SCHEDULER_` prefix) for schedule type Automatic;
    `uniform` / `karras` the ones for an explicit Uniform or Karras schedule ("" where that schedule is not offered).
    `eta` is the eta the scheduler always runs with (None: it takes no eta), `ancestral` whether it adds fresh noise
    each step (so A1111's s_noise would matter)."""

    name: str
    aliases: tuple[str, ...]
    scheduler: str
    uniform: str = ""
    karras: str = ""
    eta: float | None = None
    ancestral: bool = False

    def schedule(self, label: str) -> str:
        """The contract scheduler for schedule type `label` (Automatic, Uniform, Karras), or "" if not offered."""
        return {AUTOMATIC: self.scheduler, UNIFORM: self.uniform or self.scheduler, KARRAS: self.karras}.get(label, "")


SAMPLERS = (
    Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "EULER_ANCESTRAL", eta=1.0, ancestral=True),
    Sampler("Euler", ("k_euler",), "EULER"),
    Sampler("LMS", ("k_lms",), "LMS"),
    Sampler("Heun", ("k_heun",), "HEUN"),
    # A1111 1.9+ runs DPM++ 2M with Karras sigmas unless another schedule type is named.
    Sampler("DPM++ 2M", ("k_dpmpp_2m",), "DPMPP_2M_KARRAS", uniform="DPMPP_2M", karras="DPMPP_2M_KARRAS"),
    Sampler("DDIM", ("ddim",), "DDIM", eta=0.0),
    Sampler("PLMS", ("plms", "PNDM"), "PNDM"),
    Sampler("UniPC", ("unipc",), "UNIPC"),
    Sampler("LCM", ("lcm",), "LCM"),
    # Not an A1111 sampler; offered under its own name because the contract has it.
    Sampler("DDPM", ("ddpm",), "DDPM", ancestral=True),
)
# Names that fix the schedule type: A1111's before 1.9 (where it was part of the name) and the contract's own.
FORCED = {
    "dpm++ 2m karras": ("DPM++ 2M", KARRAS),
    "k_dpmpp_2m_ka": ("DPM++ 2M", KARRAS),
    "dpmpp_2m_karras": ("DPM++ 2M", KARRAS),
    "dpmpp_2m": ("DPM++ 2M", UNIFORM),
}
SCHEDULE_LABELS = {"automatic": AUTOMATIC, "uniform": UNIFORM, "karras": KARRAS}

_BY_NAME = {s.name.lower(): s for s in SAMPLERS}
_BY_NAME.update({a.lower(): s for s in SAMPLERS for a in s.aliases})
# The contract's own names are accepted too (what sdserve's gRPC clients say).
_BY_NAME.update({s.scheduler.lower(): s for s in SAMPLERS if not s.uniform})


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved sampler: its A1111 name, the schedule type that runs and the contract scheduler it runs."""

    sampler: Sampler
    schedule: str
    scheduler: str

    @property
    def enum(self) -> pb.Scheduler.ValueType:
        return pb.Scheduler.Value("SCHEDULER_" + self.scheduler)


def offered(schedulers: list[str]) -> list[Sampler]:
    """The samplers whose every scheduler this server offers (`schedulers`: the contract names it lists)."""
    have = set(schedulers)
    return [s for s in SAMPLERS if s.scheduler in have and (not s.uniform or s.uniform in have)]


def resolve(name: str, schedule: str | None, field: str = "sampler_name") -> Choice | FieldViolation:
    """The choice for A1111 sampler `name` (given in `field`) and schedule type `schedule`, or what is wrong."""
    key = name.strip().lower().removeprefix("scheduler_")
    forced = ""
    if key in FORCED:
        key, forced = FORCED[key][0].lower(), FORCED[key][1]
    sampler = _BY_NAME.get(key)
    if sampler is None:
        known = ", ".join(s.name for s in SAMPLERS)
        return FieldViolation(field, f"unknown or unsupported sampler {name!r}; this server offers {known}")
    label = SCHEDULE_LABELS.get((schedule or "automatic").strip().lower(), "")
    if forced and label in (AUTOMATIC, forced):
        label = forced
    elif forced or not label or not sampler.schedule(label):
        ok = [x for x in (AUTOMATIC, UNIFORM, KARRAS) if sampler.schedule(x)]
        rule = f"schedule type {schedule!r} is not offered with sampler {name!r}; use one of {', '.join(ok)}"
        return FieldViolation("scheduler", rule)
    scheduler = sampler.schedule(label)
    # Report the schedule that runs (DPM++ 2M's Automatic is Karras), as the infotext will say.
    return Choice(sampler, a1111_names(scheduler)[1], scheduler)


def a1111_names(scheduler: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule type) of a contract scheduler name (as sdserve's infotext writes it)."""
    key = scheduler.strip().upper().removeprefix("SCHEDULER_")
    for s in SAMPLERS:
        for label, value in ((KARRAS, s.karras), (UNIFORM, s.uniform), (AUTOMATIC, s.scheduler)):
            if value == key:
                return s.name, label
    return scheduler, AUTOMATIC
