"""Test harness: the sidecar as a real subprocess (so it can be killed -9), and tiny repositories for the local hub."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import torch

from sdserve.models_client import ModelManagerClient
from tests.model_manager.hubserver import folder_files

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_REPO = "sdserve-test/tiny-sd"
BIG_REPO = "sdserve-test/tiny-sd-big"


class Sidecar:
    """`python -m model_manager` on port 0 with its own store; ready once it logs `serving`.

    `metrics` serves /metrics on a free port (`metrics_port`; off otherwise, so sidecars never compete for 9401).
    `api_key` and `credentials` are what `client()` connects with; the sidecar's own TLS and key flags go in `args`.
    """

    def __init__(
        self,
        store: Path,
        *,
        hub_url: str = "http://127.0.0.1:9",
        import_roots: Sequence[Path] = (),
        args: Sequence[str] = (),
        wrapper: Sequence[str] = (),
        metrics: bool = False,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.store = store
        self.hub_url = hub_url
        self.import_roots = tuple(import_roots)
        self.args = tuple(args)
        self.wrapper = tuple(wrapper)
        self.metrics = metrics
        self.api_key = api_key
        self.credentials = credentials
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.metrics_port = 0
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._changed = threading.Condition()

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            sys.executable,
            "-m",
            "model_manager",
            "--store", str(self.store),
            "--host", "127.0.0.1",
            "--port", "0",
            "--log-format", "json",
            "--hf-endpoint", self.hub_url,
            "--hub-timeout", "5",
            "--min-free-bytes", "0",
            "--quality-steps", "2",
            "--quality-size", "32",
            "--torch-threads", "1",
            "--import-roots", ":".join(str(r) for r in self.import_roots),
            "--metrics-port", "0" if self.metrics else "-1",
            *self.args,
        ]  # fmt: skip

    def start(self) -> Sidecar:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SDSERVE_MANAGER", "TRANSFORMERS_OFF"))}
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + str(REPO_ROOT / "clients" / "python")
        self._ready.clear()
        self.port = 0
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(120) or not self.port:
            self.kill()
            raise RuntimeError("the sidecar did not start:\n" + "".join(self.lines[-30:]))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "serving":
                self.port = int(record["port"])
                self.metrics_port = int(record.get("metrics_port", 0))
                self._ready.set()
        self._ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> ModelManagerClient:
        return ModelManagerClient(self.target, api_key=self.api_key, credentials=self.credentials)

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_for_log(self, msg: str, timeout: float = 60.0) -> bool:
        """Blocks until the sidecar has logged a record with this message (woken by each new log line)."""

        return self.wait_until(lambda: any(r.get("msg") == msg for r in self.logs()), timeout)

    def wait_until(self, seen: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Blocks until `seen()` holds, re-checking on each new log line; False after `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(seen, timeout)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the sidecar."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


def build_big(small: Path, folder: Path) -> Path:
    """The tiny model with a wider UNet whose weights file (about 15 MiB) exceeds huggingface_hub's 10 MiB download
    chunk, so an interrupted transfer leaves bytes on disk to resume from."""
    import shutil

    from diffusers import UNet2DConditionModel

    if (folder / "model_index.json").exists():
        return folder
    shutil.copytree(small, folder)
    shutil.rmtree(folder / "unet")
    torch.manual_seed(3)
    config = dict(UNet2DConditionModel.load_config(small / "unet"))
    config["block_out_channels"] = (64, 128)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def fp16_files(folder: Path) -> dict[str, bytes]:
    """The `<name>.fp16.safetensors` files of a diffusers folder, as a Hub repository holds them."""
    from safetensors.torch import load_file, save

    out = {}
    for comp, base in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        tensors = load_file(folder / comp / f"{base}.safetensors")
        half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
        out[f"{comp}/{base}.fp16.safetensors"] = save(half, metadata={"format": "pt"})
    return out


def hub_files(folder: Path, with_fp16: bool = True) -> dict[str, bytes]:
    """A hub-layout repository of a tiny model, with files the pipeline does not need beside the ones it does."""
    files = folder_files(folder)
    if with_fp16:
        files.update(fp16_files(folder))
    files["README.md"] = b"# tiny\n"
    files["v1-5-pruned.ckpt"] = b"\x80\x02not loaded"
    files["safety_checker/model.safetensors"] = files["text_encoder/model.safetensors"]
    files["unet/diffusion_pytorch_model.bin"] = b"\x80\x02pickled"
    return files


def render_served(folder: Path, seed: int = 7, steps: int = 3, size: int = 64) -> np.ndarray:
    """The image the inference server's own loader and pipeline path make from a stored folder (float RGB in
    [0, 1])."""
    from diffusers import DDIMScheduler

    from sdserve_core.pipeline.call import PipelineCall
    from sdserve_core.pipeline.run import run
    from service import device
    from service.models import ModelEntry, load
    from service.requests import Task

    entry = ModelEntry.read(folder)
    loaded = load(entry, device.choose("cpu", "float32"))
    call = PipelineCall(
        task=Task.GENERATE,
        steps=steps,
        width=size,
        height=size,
        generators=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        prompt="a tiny test image",
    )
    images = run(loaded.components, call, DDIMScheduler.from_config(entry.scheduler_config))
    return np.asarray(images[0], dtype=np.float32)
