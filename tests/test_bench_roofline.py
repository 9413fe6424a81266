"""bench.roofline runs (on the tiny model, one timed step per lever) and counts what it claims: the FLOPs of a
guided UNet step equal the convolutions' and matmuls' own arithmetic, and the report holds every lever."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import roofline


def test_flops_of_a_linear_layer_are_counted_exactly() -> None:
    layer = torch.nn.Linear(64, 32, bias=False)

    class Wrapped(torch.nn.Module):
        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = layer(sample)
            return out

    assert roofline.step_flops(Wrapped(), {"sample": torch.randn(2, 10, 64)}) == 2 * 2 * 10 * 64 * 32


def test_the_roofline_report_covers_every_lever(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    roofline.main(["--models", "tiny", "--repeats", "1", "--out", str(out), "--threads", "1"])
    report = json.loads(out.read_text())
    assert report["matmul_peak_flops"]["fp32"] > 0 and report["matmul_peak_flops"]["bf16"] > 0
    (model,) = report["models"]
    assert model["flops_per_step"] > 1e8  # the shapes UNet: about 0.34 GFLOP per guided step at 64x64
    assert set(model["levers"]) == {"fp32", "bf16 autocast", "channels_last"}
    assert all(seconds > 0 for seconds, _ in model["levers"].values())
