"""Every scheduler runs at the step limit the server allows for it: no request within the limits can index past
the noise schedule (a DDIM model with "leading" spacing once answered INTERNAL at steps == 1000)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sdserve import Client, SdserveError
from service import schedulers
from tests.harness import TINY, serving

T = 1000
CONFIGS: dict[str, dict[str, Any]] = {
    # SD 1.5's own scheduler config (and the tiny test models'): leading spacing shifted by one.
    "leading+1": {"_class_name": "DDIMScheduler", "num_train_timesteps": T, "timestep_spacing": "leading",
                  "steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "trailing": {"_class_name": "DDIMScheduler", "num_train_timesteps": T, "timestep_spacing": "trailing",
                 "steps_offset": 1, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "linspace": {"_class_name": "PNDMScheduler", "num_train_timesteps": T, "timestep_spacing": "linspace",
                 "steps_offset": 0, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
}  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("name", ["", *schedulers.SCHEDULERS])
def test_the_step_limit_stays_inside_the_noise_schedule(name: str, config: str) -> None:
    cfg = CONFIGS[config]
    limit = schedulers.max_steps(name, cfg)
    scheduler = schedulers.build(name, cfg)
    scheduler.set_timesteps(limit)
    if scheduler.__class__.__name__ in ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler"):
        # These index the noise schedule by timestep; the others interpolate sigmas and take any value.
        assert int(scheduler.timesteps.max()) < T
    sample = torch.zeros(1, 1, 1, 1)
    # The schedule's start, where the largest timesteps are, as a pipeline runs it (zeros stand in for the model).
    for t in scheduler.timesteps[:3]:
        sample = scheduler.step(torch.zeros_like(sample), t, scheduler.scale_model_input(sample, t)).prev_sample


def test_a_request_past_the_limit_is_invalid_not_internal(models_dir: Path) -> None:
    with serving(models_dir, max_steps=1000, default_model=TINY) as srv, Client(srv.target) as c:
        with pytest.raises(SdserveError) as info:
            c.generate("x", steps=1000, scheduler="DDIM")
        assert info.value.code == "INVALID_ARGUMENT"
        assert [v.field for v in info.value.violations] == ["params.steps"]
        assert "at most 999" in info.value.violations[0].description
