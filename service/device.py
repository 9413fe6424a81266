"""Picks the device and dtype: CUDA, MPS, XPU or CPU, overridable in settings."""

from __future__ import annotations

import dataclasses
import platform

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """The device the worker owns and the dtype models load in."""

    device: torch.device
    dtype: torch.dtype
    name: str

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if _xpu_available():
        return torch.device("xpu", 0)
    return torch.device("cpu")


def _auto_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        # fp16 is the SD 1.x/2.x norm and fastest on every CUDA card; bf16 only where fp16 is missing.
        return torch.float16
    if device.type in ("mps", "xpu"):
        return torch.float16
    return torch.float32


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    if device.type == "xpu":
        return str(torch.xpu.get_device_name(device))
    if device.type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine() or "cpu"


def choose(device: str, dtype: str) -> DeviceChoice:
    """Resolves the `device` and `dtype` settings ("auto" or an explicit value)."""
    dev = _auto_device() if device == "auto" else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"device {device!r} asked for, but MPS is not available")
    if dev.type == "xpu" and not _xpu_available():
        raise SystemExit(f"device {device!r} asked for, but XPU is not available")
    if dtype == "auto":
        dt = _auto_dtype(dev)
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise SystemExit(f"dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
    return DeviceChoice(device=dev, dtype=dt, name=_device_name(dev))
