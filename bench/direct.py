"""The baseline: the diffusers pipeline called in-process, one request at a time, in a child process.

The child loads the pipeline once, then runs requests on command (one JSON line in, one out), so the benchmark
can interleave baseline and sdserve requests and both see the same machine load.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bench import workload
from bench.stats import RequestRecord
from bench.workload import Workload

SD_PIPELINES = frozenset({"StableDiffusionPipeline"})
SDXL_PIPELINES = frozenset({"StableDiffusionXLPipeline"})


def _child(spec: dict[str, Any], commands: IO[str], replies: IO[str]) -> None:
    """Loads and warms the pipeline, reports ready, then answers requests until stdin closes.

    A request is timed from the pipeline call to the PNG bytes: diffusion, PIL conversion and PNG encoding.
    """
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import diffusers

    t_load = time.perf_counter()
    # As a user would load each: SD 1.x without its safety checker, SDXL without its invisible watermark (sdserve
    # returns the model's own pixels for both).
    extra: dict[str, Any] = (
        {"add_watermarker": False} if spec["pipeline"] in SDXL_PIPELINES else {"safety_checker": None}
    )
    cls = getattr(diffusers, spec["pipeline"])
    pipe = cls.from_pretrained(spec["model_dir"], use_safetensors=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    loaded_at = time.time()
    t_warm = time.perf_counter()
    width, height, guidance = int(spec["width"]), int(spec["height"]), float(spec["guidance"])
    png_dir = Path(spec["png_dir"])
    png_dir.mkdir(parents=True, exist_ok=True)

    def call(prompt: str, seed: int, steps: int, marks: list[float]) -> Any:
        def on_step_end(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            marks.append(time.perf_counter())
            return kw

        with torch.inference_mode():
            return pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
                callback_on_step_end=on_step_end,
            ).images[0]

    warm_prompt, warm_seed = spec["warmup"]
    call(warm_prompt, warm_seed, int(spec["warmup_steps"]), [])
    ready = {
        "import_s": t_load - t_import,
        "load_s": t_warm - t_load,
        "warmup_s": time.perf_counter() - t_warm,
        "loaded_at": loaded_at,
        "warmed_at": time.time(),
    }
    replies.write(json.dumps(ready) + "\n")
    replies.flush()
    for line in commands:
        cmd = json.loads(line)
        if cmd.get("rss"):
            # ru_maxrss is in KiB on Linux.
            replies.write(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}) + "\n")
            replies.flush()
            continue
        marks: list[float] = []
        start = time.perf_counter()
        image = call(cmd["prompt"], int(cmd["seed"]), int(cmd["steps"]), marks)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        end = time.perf_counter()
        (png_dir / f"{cmd['index']}.png").write_bytes(buf.getvalue())
        record = {
            "index": cmd["index"],
            "latency": end - start,
            "first_progress": marks[0] - start,
            "started": 0.0,
            "batch_size": 1,
            "step_times": [b - a for a, b in itertools.pairwise(marks)],
        }
        replies.write(json.dumps(record) + "\n")
        replies.flush()


def pipeline_class(model_dir: Path) -> str:
    """The diffusers pipeline class a user would load the folder with: its model_index.json's."""
    index = json.loads((model_dir / "model_index.json").read_text())
    name = str(index["_class_name"])
    if name not in SD_PIPELINES | SDXL_PIPELINES:
        raise ValueError(f"{model_dir}: the baseline runs text-to-image pipelines only, not {name}")
    return name


class DirectProcess:
    """The baseline child: `cold_start_s` is spawn to loaded and warmed; `request(i)` runs request i."""

    def __init__(self, wl: Workload, threads: int, workdir: Path):
        self.wl = wl
        self.pipeline = pipeline_class(wl.model_dir / wl.model)
        self.png_dir = workdir / "direct-png"
        spec = {
            "model_dir": str(wl.model_dir / wl.model),
            "pipeline": self.pipeline,
            "width": wl.width,
            "height": wl.height,
            "guidance": wl.guidance,
            "threads": threads,
            "warmup": [workload.prompt(workload.PHASE_BASE["warmup"]), workload.seed(workload.PHASE_BASE["warmup"])],
            "warmup_steps": wl.warmup_steps,
            "png_dir": str(self.png_dir),
        }
        self.log_path = workdir / "direct.log"
        self._log = self.log_path.open("w")
        spawned = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.direct", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        ready = self._reply()
        self.info: dict[str, float] = {
            "import_s": ready["import_s"],
            "load_s": ready["load_s"],
            "warmup_s": ready["warmup_s"],
            "spawn_to_loaded_s": ready["loaded_at"] - spawned,
            "cold_start_s": ready["warmed_at"] - spawned,
        }

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            raise RuntimeError(f"the direct baseline exited ({self.proc.wait()}): {self.log_path.read_text()[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def request(self, index: int) -> RequestRecord:
        r = self._send(
            {"index": index, "prompt": workload.prompt(index), "seed": workload.seed(index), "steps": self.wl.steps}
        )
        return RequestRecord(**{**r, "step_times": tuple(r["step_times"])})

    def peak_rss(self) -> int:
        return int(self._send({"rss": True})["peak_rss"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def main() -> None:
    """Child entry point: replies go to a private copy of stdout; anything a library prints goes to stderr."""
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _child(json.loads(sys.argv[1]), sys.stdin, replies)


if __name__ == "__main__":
    main()
