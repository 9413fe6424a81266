"""Module construction never overlaps a load: diffusers' from_pretrained patches process-wide state for the length of
a load (torch.nn.init turned off, new parameters put on the meta device), so the device worker's own construction
(LoRA layers, the tiny fallback model) waits for sdserve_core.components.CONSTRUCTION_LOCK, which loads hold."""

from __future__ import annotations

import threading
from pathlib import Path

import accelerate
import torch

from sdserve_core.components import CONSTRUCTION_LOCK, load_components
from service.tiny import build_tiny


def test_the_tiny_model_is_built_after_a_load_in_progress_not_during_it(tmp_path: Path) -> None:
    in_load = threading.Event()
    release = threading.Event()

    def a_load_in_progress() -> None:
        # What a hot swap's from_pretrained does on its own thread, held until the builder has had its chance.
        with CONSTRUCTION_LOCK, accelerate.init_empty_weights():
            in_load.set()
            release.wait(120)

    loader = threading.Thread(target=a_load_in_progress)
    loader.start()
    assert in_load.wait(60)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_tiny(tmp_path / "tiny")
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    builder = threading.Thread(target=build)
    builder.start()
    # Without the lock the build runs inside the load's context now and fails ("Cannot copy out of meta tensor").
    builder.join(10)
    release.set()
    loader.join(60)
    builder.join(120)
    assert errors == []
    components = load_components(tmp_path / "tiny", "", torch.float32, "cpu")
    unet: torch.nn.Module = components.unet  # type: ignore[assignment]
    weights = list(unet.parameters())
    assert all(p.device.type == "cpu" for p in weights)
    assert any(bool(p.abs().sum() > 0) for p in weights)
