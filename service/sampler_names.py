"""A1111's sampler and schedule-type names for the contract's schedulers: the infotext sdserve writes into images
uses them (as A1111 does), and the A1111-compatible API (service/a1111) maps request names with them."""

from __future__ import annotations

import dataclasses

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


def a1111_names(scheduler: str) -> tuple[str, str]:
    """(A1111 sampler name, schedule type) of a contract scheduler name (as sdserve's infotext writes it)."""
    key = scheduler.strip().upper().removeprefix("SCHEDULER_")
    for s in SAMPLERS:
        for label, value in ((KARRAS, s.karras), (UNIFORM, s.uniform), (AUTOMATIC, s.scheduler)):
            if value == key:
                return s.name, label
    return scheduler, AUTOMATIC
