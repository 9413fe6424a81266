"""The `onnxruntime` lever: an SD 1.x UNet exported to ONNX (dynamic batch, size and prompt length) and run by ONNX
Runtime's CPU provider, behind the UNet's own call signature so a diffusers pipeline runs it unchanged.

On the reference 2-core CPU the UNet ran 2.7x faster on the tiny shapes model and 1.2-1.4x faster on sd15-small than
torch eager fp32, with a relative error of the UNet's output of 1e-6 (docs/performance.md). The export (seconds for
small models, minutes for SD 1.5) is cached on disk keyed by the weights' SHA-256, so a restart only opens the
session. Calls the export does not cover (SDXL's added conditioning, LCM's timestep conditioning, attention kwargs
such as LoRA scales, non-float32 inputs, a batch of timesteps) run on the eager UNet."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_ATTR = "_sdserve_onnx"
_lock = threading.Lock()
# Where exports are kept (set by use_cache; default: a folder under the user's cache).
_cache = {"dir": Path.home() / ".cache" / "sdserve" / "compile" / "onnx"}


def available() -> bool:
    """Whether onnxruntime (and onnx, for the export) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def supports(unet: Any) -> bool:
    """Whether the export covers this UNet's plain call: SD 1.x/2.x layouts (no added embeddings, no timestep
    conditioning), float32 weights on the CPU."""
    config = unet.config
    plain = getattr(config, "addition_embed_type", None) is None and getattr(config, "time_cond_proj_dim", None) is None
    first = next(unet.parameters())
    return bool(plain and first.dtype == torch.float32 and first.device.type == "cpu")


def use_cache(folder: Path) -> None:
    """Keeps exported graphs in `folder` (beside the compile cache)."""
    _cache["dir"] = folder


class _Export(torch.nn.Module):
    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> Any:
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


def _weights_key(unet: Any) -> str:
    digest = hashlib.sha256(repr(sorted(unet.config.items())).encode())
    for name, tensor in unet.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _export(unet: Any, path: Path) -> None:
    """Exports `unet` (TorchScript exporter, opset 17) with dynamic batch, height, width and prompt length."""
    config = unet.config
    size = int(config.sample_size) if isinstance(config.sample_size, int) else int(config.sample_size[0])
    args = (
        torch.zeros(2, config.in_channels, size, size),
        torch.tensor(500.0),
        torch.zeros(2, 77, config.cross_attention_dim),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent)) / path.name
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Export(unet),
            args,
            str(tmp),
            input_names=["sample", "timestep", "context"],
            output_names=["out"],
            dynamo=False,
            opset_version=17,
            dynamic_axes={"sample": dynamic, "context": {0: "batch", 1: "tokens"}, "out": dynamic},
        )
    os.replace(tmp, path)
    tmp.parent.rmdir()


class OrtUNet(torch.nn.Module):
    """The UNet as ONNX Runtime runs it: `config`, `dtype`, `device` and the call are the eager UNet's."""

    def __init__(self, unet: Any, session: Any) -> None:
        super().__init__()
        self.eager = unet
        self._session = session

    @property
    def config(self) -> Any:
        return self.eager.config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        extra = {k: v for k, v in kwargs.items() if v is not None and k != "return_dict"}
        t = torch.as_tensor(timestep)
        if extra or t.numel() != 1 or sample.dtype != torch.float32 or encoder_hidden_states.dtype != torch.float32:
            return self.eager(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        feed = {
            "sample": sample.detach().contiguous().numpy(),
            "timestep": t.reshape(()).to(torch.float32).numpy(),
            "context": encoder_hidden_states.detach().contiguous().numpy(),
        }
        out = torch.from_numpy(np.asarray(self._session.run(None, feed)[0]))
        return (out,) if kwargs.get("return_dict") is False else _Output(out)


class _Output:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # ONNX Runtime's threads spin after each run by default and take the cores from torch's next op (10x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_unet(unet: Any) -> OrtUNet:
    """`unet` run by ONNX Runtime, built once per module (exported on first use, or read from the cache). Raises
    ValueError for a UNet the export does not cover and ImportError without onnxruntime."""
    if not supports(unet):
        raise ValueError("the onnxruntime lever runs float32 SD 1.x/2.x UNets on the CPU only")
    with _lock:
        found: OrtUNet | None = unet.__dict__.get(_ATTR)
        if found is None:
            path = _cache["dir"] / _weights_key(unet) / "unet.onnx"
            if not path.exists():
                logger.info("exporting the UNet to ONNX", extra={"path": str(path)})
                _export(unet, path)
            found = OrtUNet(unet, _session(path))
            # Not a submodule (object attribute): the wrapper refers back to the UNet; the GC frees the cycle.
            unet.__dict__[_ATTR] = found
        return found
