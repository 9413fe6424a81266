"""int8 quantization reads text encoders saved by either transformers generation: transformers 4 (every file on the
Hub) saved CLIPTextModel weights under `text_model.`, transformers 5's CLIPTextModel has no such module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdserve_core.quant import TEXT_MODEL_PREFIX, load_int8_component, quantize_component
from service.tiny_sdxl import tiny_text_encoder


@pytest.mark.parametrize(("cls", "projection"), [(CLIPTextModel, False), (CLIPTextModelWithProjection, True)])
def test_quantizes_text_encoders_whichever_transformers_saved_them(tmp_path: Path, cls: type, projection: bool) -> None:
    source = tmp_path / ("text_encoder_2" if projection else "text_encoder")
    model = tiny_text_encoder(0, projection=projection)
    model.save_pretrained(source, safe_serialization=True)
    weights = source / "model.safetensors"
    state = load_file(weights)
    if not projection:
        assert not any(k.startswith(TEXT_MODEL_PREFIX) for k in state)  # transformers 5's CLIPTextModel names
        # Rewrite the file as transformers 4 saved it: the encoder's modules under text_model.
        weights.unlink()
        save_file({TEXT_MODEL_PREFIX + k: v for k, v in state.items()}, weights, metadata={"format": "pt"})
    dest = tmp_path / "int8" / source.name
    config = quantize_component(cls, source, dest)
    assert config["modules"]
    loaded = load_int8_component(cls, tmp_path / "int8", source.name, torch.float32, "cpu")
    ids = torch.tensor([[512, 40, 41, 513]])
    with torch.inference_mode():
        ours = loaded(ids).last_hidden_state
        theirs = model(ids).last_hidden_state
    assert (ours - theirs).abs().max() < 0.05
