"""A1111 sampler and schedule-type names mapped onto the contract's Scheduler values, and back."""

from __future__ import annotations

import dataclasses

from sdserve.v1 import diffusion_pb2 as pb
from sdserve_core.status import FieldViolation
from service.sampler_names import AUTOMATIC, KARRAS, SAMPLERS, UNIFORM, Sampler, a1111_names

__all__ = ["AUTOMATIC", "KARRAS", "SAMPLERS", "UNIFORM", "Choice", "Sampler", "a1111_names", "offered", "resolve"]

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
