"""The `sdserve` command: serve, generate, edit, inpaint, models and info."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from sdserve import _convert
from sdserve.cli_args import (
    LoraAction,
    Parser,
    add_connection_flags,
    connect,
    crop_offset,
    flag_error,
    image_size,
    lora,
    read_file,
)
from sdserve.client import Stream
from sdserve.errors import SdserveError
from sdserve.models_cli import add_models_commands, human_bytes
from sdserve.supervisor import Child, Supervisor
from sdserve.types import SCHEDULER_NAMES as SCHEDULERS
from sdserve.types import GenerationOptions, Progress, Queued, ResolvedAdapter, Result, Retrying, Started
from sdserve.v1 import diffusion_pb2 as pb

# What `sdserve serve` needs beyond the client: the server distribution (pip install 'sdserve[server]').
SERVER_MODULES = ("service", "model_manager", "grpc_reflection", "torch", "diffusers")


class ProgressBar:
    """A one-line progress bar on a terminal; plain step lines otherwise."""

    def __init__(self, out: TextIO, enabled: bool):
        self.out = out
        self.tty = enabled and out.isatty()
        self.enabled = enabled
        self.start = time.monotonic()
        self.last_line = ""

    def show(self, step: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self.tty:
            width = 30
            filled = int(width * step / max(total, 1))
            rate = step / elapsed if elapsed > 0 else 0.0
            line = f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {rate:5.1f} it/s {elapsed:6.1f}s {note}"
            self.out.write(line.ljust(len(self.last_line)))
            self.last_line = line
        else:
            self.out.write(f"step {step}/{total} {elapsed:.2f}s {note}\n")
        self.out.flush()

    def status(self, text: str) -> None:
        if self.enabled:
            self.out.write(("\r" if self.tty else "") + text + ("" if self.tty else "\n"))
            self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _options(ns: argparse.Namespace) -> GenerationOptions:
    opts: dict[str, Any] = {}
    for key in ("model", "width", "height", "steps", "num_images", "clip_skip", "request_id"):
        value = getattr(ns, key)
        if value:
            opts[key] = value
    if ns.negative:
        opts["negative_prompt"] = ns.negative
    if ns.guidance is not None:
        opts["guidance_scale"] = ns.guidance
    if ns.seed is not None:
        opts["seed"] = ns.seed
    if ns.scheduler:
        opts["scheduler"] = ns.scheduler.upper()
    if ns.preview_dir:
        opts["preview"] = ns.preview
        opts["preview_every"] = ns.preview_every
    if ns.format:
        opts["output_format"] = ns.format
    if ns.lora:
        opts["adapters"] = list(ns.lora)
    if ns.precision:
        opts["precision"] = ns.precision
    opts.update(_sdxl_options(ns))
    return opts  # type: ignore[return-value]


# SDXL flags whose values pass through under the option's name: (namespace attribute, option).
_SDXL_FLAGS = (
    ("prompt_2", "prompt_2"),
    ("negative_prompt_2", "negative_prompt_2"),
    ("original_size", "original_size"),
    ("target_size", "target_size"),
    ("crop", "crops_coords_top_left"),
    ("negative_original_size", "negative_original_size"),
    ("negative_target_size", "negative_target_size"),
    ("negative_crop", "negative_crops_coords_top_left"),
    ("aesthetic_score", "aesthetic_score"),
    ("negative_aesthetic_score", "negative_aesthetic_score"),
)


def _sdxl_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The SDXL flags as options; the refiner's own flags need --refiner and the mode they apply to."""
    opts = {option: getattr(ns, attr) for attr, option in _SDXL_FLAGS if getattr(ns, attr) not in (None, "")}
    tuning = {
        "--refiner-mode": ns.refiner_mode,
        "--refiner-switch": ns.refiner_switch,
        "--refiner-strength": ns.refiner_strength,
    }
    if not ns.refiner:
        for flag, value in tuning.items():
            if value is not None:
                raise flag_error(flag, "needs --refiner MODEL (the refiner pass it tunes)")
        return opts
    mode = ns.refiner_mode or "latent"
    if ns.refiner_switch is not None and mode != "latent":
        raise flag_error("--refiner-switch", "applies to --refiner-mode latent only (use --refiner-strength)")
    if ns.refiner_strength is not None and mode != "image":
        raise flag_error("--refiner-strength", "applies to --refiner-mode image only (the default mode is latent)")
    opts["refiner"] = ns.refiner
    if ns.refiner_mode:
        opts["refiner_mode"] = "latent_handoff" if ns.refiner_mode == "latent" else "image"
    if ns.refiner_switch is not None:
        opts["refiner_switch_at"] = ns.refiner_switch
    if ns.refiner_strength is not None:
        opts["refiner_strength"] = ns.refiner_strength
    return opts


def _out_paths(out: str, count: int) -> list[Path]:
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _run_stream(stream: Stream, ns: argparse.Namespace) -> int:
    bar = ProgressBar(sys.stderr, not ns.quiet)
    preview_dir = Path(ns.preview_dir) if ns.preview_dir else None
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
    # With a refiner, steps count within each pass: the bar says which one.
    two_passes = bool(ns.refiner)
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        for ev in stream:
            if isinstance(ev, Queued):
                bar.status(f"queued at position {ev.position}")
            elif isinstance(ev, Started):
                bar.status(_started_line(ev))
                bar.done()
                two_passes = two_passes or bool(ev.refiner_model)
            elif isinstance(ev, Progress):
                for p in ev.previews:
                    if preview_dir is not None:
                        ext = "jpg" if p.format == "jpeg" else p.format
                        name = f"step-{ev.step:04d}-{p.index}.{ext}"
                        if two_passes and ev.denoise_pass:
                            name = f"{ev.denoise_pass}-{name}"
                        (preview_dir / name).write_bytes(p.data)
                bar.show(ev.step, ev.total_steps, ev.denoise_pass if two_passes else "")
            elif isinstance(ev, Retrying):
                where = f" on {ev.replica}" if ev.replica else ""
                bar.status(
                    f"{ev.code}{where}: trying again in {ev.delay_seconds:.1f}s ({ev.attempt + 1}/{ev.max_attempts})"
                )
                bar.done()
            elif isinstance(ev, Result):
                bar.done()
                written = []
                for img, path in zip(ev.images, _out_paths(ns.out, len(ev.images)), strict=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    img.save(str(path))
                    written.append((path, img))
                    if not ns.json:
                        print(f"{path} seed={img.seed} {img.width}x{img.height} {ev.timings.total:.2f}s")
                if ns.json:
                    print(_json(_result_dict(ev, written)))
                return 0
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.done()
    raise SdserveError("UNKNOWN", "the stream ended without a result")


def _adapter_label(a: ResolvedAdapter) -> str:
    """`NAME:SCALE@SHA` for a LoRA, `NAME (TOKEN)@SHA` for an embedding."""
    what = f"{a.name} ({a.token})" if a.kind == "textual_inversion" else f"{a.name}:{a.scale:g}"
    return f"{what}@{a.sha256[:10]}"


def _started_line(ev: Started) -> str:
    line = f"started on {ev.model}@{ev.model_revision[:10]}"
    if ev.refiner_model:
        line += f" + refiner {ev.refiner_model}@{ev.refiner_model_revision[:10]}"
    if ev.adapters:
        line += f" + adapters {', '.join(_adapter_label(a) for a in ev.adapters)}"
    if ev.execution_profile:
        line += f" ({ev.execution_profile})"
    return f"{line} seeds {list(ev.seeds)}"


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def _result_dict(ev: Result, written: list[tuple[Path, Any]]) -> dict[str, Any]:
    return {
        "images": [
            {"path": str(path), "seed": img.seed, "width": img.width, "height": img.height, "format": img.format}
            for path, img in written
        ],
        "request_id": ev.request_id,
        "parameters": ev.parameters,
        "adapters": [dataclasses.asdict(a) for a in ev.adapters],
        "timings": dataclasses.asdict(ev.timings),
    }


def cmd_generate(ns: argparse.Namespace) -> int:
    with connect(ns) as c:
        return _run_stream(c.stream_generate(ns.prompt, timeout=ns.timeout, **_options(ns)), ns)


def cmd_edit(ns: argparse.Namespace) -> int:
    image = read_file(ns.image, "--image")
    with connect(ns) as c:
        stream = c.stream_edit(image, ns.prompt, strength=ns.strength, timeout=ns.timeout, **_options(ns))
        return _run_stream(stream, ns)


def cmd_inpaint(ns: argparse.Namespace) -> int:
    image = read_file(ns.image, "--image")
    mask = read_file(ns.mask, "--mask")
    with connect(ns) as c:
        stream = c.stream_inpaint(
            image,
            mask,
            ns.prompt,
            strength=ns.strength,
            mask_blur=ns.mask_blur,
            invert_mask=ns.invert_mask,
            area="mask_only" if ns.only_masked else "whole_image",
            mask_padding=ns.mask_padding,
            preserve_unmasked=ns.preserve_unmasked,
            timeout=ns.timeout,
            **_options(ns),
        )
        return _run_stream(stream, ns)


def _scheduler_name(value: int) -> str:
    try:
        return pb.Scheduler.Name(value).removeprefix("SCHEDULER_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def info_dict(info: pb.GetServerInfoResponse) -> dict[str, Any]:
    """GetServerInfo as plain JSON values (the CLI's --json output)."""
    nested = ("schedulers", "limits", "batch_limits", "memory", "families", "adapters", "profiles")
    data = {k: v for k, v in _fields(info).items() if k not in nested}
    data["schedulers"] = [_scheduler_name(s) for s in info.schedulers]
    data["limits"] = _fields(info.limits)
    data["batch_limits"] = [_fields(b) for b in info.batch_limits]
    data["families"] = [
        {"name": f.name, "pipeline_classes": list(f.pipeline_classes), "fields": list(f.fields)} for f in info.families
    ]
    if info.HasField("memory"):
        data["memory"] = {**_fields(info.memory), "offloaded_models": list(info.memory.offloaded_models)}
    data["adapters"] = [dataclasses.asdict(_convert.adapter_info(a)) for a in info.adapters]
    for a in data["adapters"]:
        a["targets"], a["loaded_in"] = list(a["targets"]), list(a["loaded_in"])
    data["profiles"] = [{**_fields(p), "trials": [_fields(t) for t in p.trials]} for p in info.profiles]
    return data


def _profile_lines(info: pb.GetServerInfoResponse) -> list[str]:
    """The execution-profile lines of `sdserve info`: the mode, then each model's profile and its trials."""
    lines = [f"precision    {info.precision or '-'} by default; profiles {info.execution_profile or '-'}"]
    for p in info.profiles:
        trials = "; ".join(
            f"{t.profile} {t.seconds_per_step * 1000:.1f} ms/step"
            + (f", {t.psnr_db:.1f} dB" if t.psnr_db else "")
            + (f" ({t.reason})" if t.reason else "")
            for t in p.trials
        )
        variant = f" {p.model_variant}" if p.model_variant else ""
        lines.append(
            f"profile      {p.model}{variant}: {p.profile} ({p.source}, {p.seconds:.1f} s)"
            + (f": {trials}" if trials else "")
        )
    return lines


def _memory_line(m: pb.MemoryPolicy) -> str:
    tiling = m.vae_tiling or "-"
    if m.vae_tiling == "auto" and m.vae_tiling_min_pixels:
        tiling += f" (from {m.vae_tiling_min_pixels:,} px)"
    free = human_bytes(m.device_free_bytes) if m.device_free_bytes else "not measured"
    offloaded = ", ".join(m.offloaded_models) or "none"
    return (
        f"memory       vae tiling {tiling}, vae slicing {m.vae_slicing or '-'}, attention slicing "
        f"{m.attention_slicing or '-'}, cpu offload {m.cpu_offload or '-'}; device free {free}; offloaded: {offloaded}"
    )


def info_lines(info: pb.GetServerInfoResponse) -> list[str]:
    """GetServerInfo for a person: one labelled line per topic."""
    lim = info.limits
    wait = f"{lim.default_max_queue_seconds:g} s" if lim.default_max_queue_seconds else "no limit"
    lines = [
        f"server       sdserve {info.version}",
        f"device       {info.device}{f' ({info.device_name})' if info.device_name else ''}, dtype {info.dtype}",
        f"default      {info.default_model or '-'}",
        f"schedulers   {', '.join(_scheduler_name(s) for s in info.schedulers)}",
        f"versions     python {info.python_version}, torch {info.torch_version}, "
        f"diffusers {info.diffusers_version}, transformers {info.transformers_version}",
        f"sizes        {lim.min_size}-{lim.max_size} px per side; input images up to {lim.max_input_pixels:,} px "
        f"and {human_bytes(lim.max_image_bytes)}",
        f"requests     up to {lim.max_steps} steps, {lim.max_images} images, {lim.max_prompt_chars} prompt "
        f"characters, {lim.max_adapters} adapters, {human_bytes(lim.max_message_bytes)} messages",
        f"queue        {lim.max_queue} requests per model; default longest wait: {wait}",
    ]
    for b in info.batch_limits:
        variant = f" {b.variant}" if b.variant else ""
        precision = f", {b.precision}" if b.precision else ""
        lines.append(
            f"batch        {b.model}{variant} {b.width}x{b.height}: up to {b.max_batch_images} images "
            f"({b.source}{precision})"
        )
    for f in info.families:
        own = f"; its own fields: {', '.join(f.fields)}" if f.fields else ""
        lines.append(f"family       {f.name}: {', '.join(f.pipeline_classes)}{own}")
    if info.HasField("memory"):
        lines.append(_memory_line(info.memory))
    lines += _profile_lines(info)
    for a in map(_convert.adapter_info, info.adapters):
        kind = f"embedding {a.token}" if a.kind == "textual_inversion" else (a.kind or "?")
        loaded = f"; loaded in {', '.join(a.loaded_in)}" if a.loaded_in else ""
        lines.append(
            f"adapter      {a.name}: {kind} for {a.family or '-'} ({a.base or '-'}), {', '.join(a.targets) or '-'}, "
            f"{human_bytes(a.size_bytes)}, sha256 {a.sha256[:12]}{loaded}"
        )
    return lines


def cmd_info(ns: argparse.Namespace) -> int:
    with connect(ns) as c:
        info = c.server_info()
    print(_json(info_dict(info)) if ns.json else "\n".join(info_lines(info)))
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    with connect(ns) as c:
        models, default = c.list_models()
    if ns.json:
        print(_json({"default_model": default, "models": [dataclasses.asdict(m) for m in models]}))
        return 0
    for m in models:
        mark = "*" if m.name == default else " "
        aliases = f" aliases={','.join(m.aliases)}" if m.aliases else ""
        family = (m.family or "-") + (" refiner" if m.refiner else "")
        print(
            f"{mark} {m.name:24} {m.state:8} rev={m.revision[:12]} {m.variant:5} {family:12} "
            f"tasks={','.join(m.tasks)}{aliases}"
        )
    return 0


def _health_state(ns: argparse.Namespace) -> str:
    with connect(ns) as c:
        try:
            return c.health(ns.service, timeout=5)
        except SdserveError as err:
            if err.code == "INVALID_ARGUMENT":
                raise
            return err.code


def cmd_health(ns: argparse.Namespace) -> int:
    """Checks grpc.health.v1; with --wait, polls until SERVING or the wait runs out."""
    if ns.wait < 0:
        raise flag_error("--wait", f"must be 0 or more seconds, got {ns.wait:g}")
    deadline = time.monotonic() + ns.wait
    while True:
        state = _health_state(ns)
        if state == "SERVING" or time.monotonic() >= deadline:
            print(_json({"service": ns.service, "status": state}) if ns.json else state)
            return 0 if state == "SERVING" else 1
        time.sleep(0.5)


def _port(value: int | None, flag: str, low: int) -> None:
    if value is not None and not low <= value <= 65535:
        rule = {0: "0 (any free port) to 65535", 1: "1 to 65535", -1: "-1 (off), 0 (any free port) or 1 to 65535"}
        raise flag_error(flag, f"must be {rule[low]}, got {value}")


def _check_serve_flags(ns: argparse.Namespace) -> None:
    _port(ns.port, "--port", 0)
    _port(ns.metrics_port, "--metrics-port", -1)
    _port(ns.http_port, "--http-port", -1)
    if ns.http_port > 0 and ns.http_port == ns.port:
        raise flag_error("--http-port", f"must differ from --port (both {ns.port})")
    if ns.no_manager:
        return
    _port(ns.manager_port, "--manager-port", 1)
    _port(ns.manager_metrics_port, "--manager-metrics-port", -1)
    if ns.manager_port == ns.port:
        raise flag_error("--manager-port", f"must differ from --port (both {ns.port})")
    server_metrics = 9400 if ns.metrics_port is None else ns.metrics_port
    if ns.manager_metrics_port > 0 and ns.manager_metrics_port == server_metrics:
        raise flag_error("--manager-metrics-port", f"must differ from --metrics-port (both {server_metrics})")


def _absolute_paths(value: str) -> str:
    """':'-separated folders made absolute (the sidecar may run elsewhere than the shell's folder)."""
    return os.pathsep.join(str(Path(p).expanduser().resolve()) for p in value.split(os.pathsep) if p)


def missing_server_modules() -> list[str]:
    """Top-level modules `sdserve serve` needs that this environment lacks (a client-only install lacks them all)."""
    return [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]


def cmd_serve(ns: argparse.Namespace) -> int:
    """Starts the model-manager sidecar and the server, and stops both on Ctrl-C or SIGTERM (server first)."""
    _check_serve_flags(ns)
    missing = missing_server_modules()
    if missing:
        sys.stderr.write(
            "sdserve: error: `sdserve serve` needs the server, which is not installed here "
            f"(missing: {', '.join(missing)}); install it with: pip install 'sdserve[server]'\n"
        )
        return 1
    args = [sys.executable, "-m", "service", "--port", str(ns.port), "--host", ns.host]
    args += ["--http-port", str(ns.http_port)]
    if ns.model:
        args += ["--default-model", ns.model]
    if ns.model_dirs:
        args += ["--model-dirs", ns.model_dirs]
    if ns.metrics_port is not None:
        args += ["--metrics-port", str(ns.metrics_port)]
    with tempfile.TemporaryDirectory(prefix="sdserve-serve-") as tmp:
        manager = None
        if not ns.no_manager:
            ready = Path(tmp) / "manager.port"
            manager = Child(
                "model manager",
                [
                    sys.executable,
                    "-m",
                    "model_manager",
                    "--store",
                    str(Path(ns.store).expanduser()),
                    "--port",
                    str(ns.manager_port),
                    "--host",
                    "127.0.0.1",
                    "--metrics-port",
                    str(ns.manager_metrics_port),
                    "--import-roots",
                    _absolute_paths(ns.import_roots),
                    "--port-file",
                    str(ready),
                ],
                ready_file=ready,
            )
            args += ["--manager-target", f"127.0.0.1:{ns.manager_port}"]
        server = Child("server", args + ns.server_args)
        return Supervisor(server, manager).run()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="The prompt.")
    p.add_argument("--out", required=True, help="Output file; with several images, NAME-0.png, NAME-1.png, ...")
    p.add_argument("--negative", default="", help="Negative prompt.")
    p.add_argument("--model", default="", help="Model name or alias (default: the server's default).")
    p.add_argument("--seed", type=int, help="Seed of the first image (default: the server picks one).")
    p.add_argument("--steps", type=int, default=0, help="Denoising steps (default: the model's, usually 20).")
    p.add_argument("--scheduler", choices=SCHEDULERS, type=str.upper, help="Scheduler (default: the model's).")
    p.add_argument("--width", type=int, default=0, help="Width in pixels, a multiple of 8.")
    p.add_argument("--height", type=int, default=0, help="Height in pixels, a multiple of 8.")
    p.add_argument("--guidance", type=float, help="Guidance scale (default: the model's, usually 7.5).")
    p.add_argument("--num-images", type=int, default=0, help="Images to make (default 1).")
    p.add_argument("--clip-skip", type=int, default=0, help="Text-encoder layers to skip (default 0).")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), help="Output format (default png).")
    p.add_argument(
        "--precision",
        choices=("exact", "fast"),
        help="exact: bit-for-bit the diffusers pipeline; fast: the model's measured execution profile "
        "(default: the server's setting).",
    )
    p.add_argument("--preview-dir", help="Write previews into this folder as they arrive.")
    p.add_argument("--preview", choices=("latent_rgb", "full_vae"), default="latent_rgb", help="Preview kind.")
    p.add_argument("--preview-every", type=int, default=1, help="Preview every N steps.")
    p.add_argument("--request-id", default="", help="Request id echoed in the result and server logs.")
    p.add_argument("--timeout", type=float, help="Deadline in seconds.")
    p.add_argument("--quiet", action="store_true", help="No progress output.")
    p.add_argument("--json", action="store_true", help="Print the written files, seeds and timings as JSON.")
    p.add_argument(
        "--lora",
        type=lora,
        action=LoraAction,
        default=[],
        metavar="NAME[:SCALE]",
        help="Apply this LoRA adapter (as `sdserve info` lists them) to this request, at SCALE from -4 to 4 "
        "(default 1); repeat for several, each name once. Inline <lora:NAME:SCALE> tags in --prompt work too.",
    )
    _add_sdxl(p)


def _add_sdxl(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SDXL (refused for models of other families)")
    g.add_argument(
        "--prompt-2",
        default="",
        metavar="TEXT",
        help="Prompt for the second text encoder (OpenCLIP ViT-bigG); same length limit as --prompt "
        "(default: --prompt).",
    )
    g.add_argument(
        "--negative-prompt-2",
        default="",
        metavar="TEXT",
        help="Negative prompt for the second text encoder (default: --negative).",
    )
    g.add_argument(
        "--refiner",
        default="",
        metavar="MODEL",
        help="Run a second pass with this SDXL refiner model (name or alias) in the same request "
        "(default: no second pass).",
    )
    g.add_argument(
        "--refiner-mode",
        choices=("latent", "image"),
        help="How the refiner takes over: 'latent' hands the base model's undecoded latents over at "
        "--refiner-switch (total steps stay --steps); 'image' lets the base model finish and decode, then runs "
        "image-to-image at --refiner-strength (default: latent).",
    )
    g.add_argument(
        "--refiner-switch",
        type=float,
        metavar="FRACTION",
        help="Latent mode: the fraction of the denoising schedule the base model runs, above 0 and below 1 "
        "(default 0.8).",
    )
    g.add_argument(
        "--refiner-strength",
        type=float,
        metavar="FRACTION",
        help="Image mode: how far the refiner moves from the base model's image, above 0 to 1; it runs "
        "int(steps x strength) steps, at least 1 (default 0.3).",
    )
    sizes = (
        (
            "--original-size",
            "The size the model should treat the source image as having had (default: the output size).",
        ),
        ("--target-size", "The size the model should aim for (default: the output size)."),
        ("--negative-original-size", "--original-size for the negative branch of guidance (default: --original-size)."),
        ("--negative-target-size", "--target-size for the negative branch of guidance (default: --target-size)."),
    )
    for flag, text in sizes:
        g.add_argument(flag, type=image_size, metavar="WxH", help=f"{text} Pixels, each side 1 to 16384.")
    g.add_argument(
        "--crop",
        type=crop_offset,
        metavar="TOP,LEFT",
        help="Crop offset to condition on, in pixels from the top and the left, each 0 to 16384 "
        "(default 0,0: an uncropped image).",
    )
    g.add_argument(
        "--negative-crop",
        type=crop_offset,
        metavar="TOP,LEFT",
        help="Crop offset for the negative branch of guidance, pixels, each 0 to 16384 (default 0,0).",
    )
    g.add_argument(
        "--aesthetic-score",
        type=float,
        metavar="SCORE",
        help="Refiner models only: the aesthetic score to aim for, 0 to 10 (default 6.0). Applies to the refiner "
        "pass, and to edit and inpaint on a refiner model.",
    )
    g.add_argument(
        "--negative-aesthetic-score",
        type=float,
        metavar="SCORE",
        help="Refiner models only: the aesthetic score of the negative branch, 0 to 10 (default 2.5).",
    )


def _default_import_roots() -> str:
    """The current folder and the home folder; never the file system's root (a service's usual working folder)."""
    cwd = Path.cwd()
    folders = [str(cwd)] if cwd != Path(cwd.anchor) else []
    return os.pathsep.join([*folders, str(Path.home())])


def _add_serve(sub: Any, environ: Mapping[str, str]) -> None:
    p = sub.add_parser(
        "serve",
        help="Start the model manager and the server on this machine (Ctrl-C or SIGTERM stops both).",
        description="Starts the model-manager sidecar and the server as child processes. Ctrl-C or SIGTERM drains "
        "the server, then stops the sidecar. A sidecar that dies after it served is restarted; if a child fails "
        "otherwise, `sdserve serve` says which and exits non-zero. Flags after -- go to `python -m service`.",
    )
    p.add_argument("--port", type=int, default=50051, help="Server port (default 50051; 0 picks a free one).")
    p.add_argument("--host", default="127.0.0.1", help="Server interface (default 127.0.0.1; 0.0.0.0 for all).")
    p.add_argument("--model", default="", help="Default model (default: the embedded model).")
    p.add_argument("--model-dirs", default="", help="Model folders, ':'-separated (default: the server's).")
    p.add_argument("--metrics-port", type=int, help="Server /metrics port (default 9400; -1 off).")
    p.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="HTTP port: Connect/JSON, the A1111-compatible /sdapi/v1, the playground page at / "
        "(default 8080; 0 picks a free one; -1 off).",
    )
    p.add_argument(
        "--store",
        default=environ.get("SDSERVE_MANAGER_STORE", "~/.cache/sdserve/store"),
        help="The model manager's store folder (env SDSERVE_MANAGER_STORE; default ~/.cache/sdserve/store).",
    )
    p.add_argument("--manager-port", type=int, default=50052, help="The model manager's port on 127.0.0.1.")
    p.add_argument("--manager-metrics-port", type=int, default=9401, help="The sidecar's /metrics port (-1 off).")
    p.add_argument(
        "--import-roots",
        default=environ.get("SDSERVE_MANAGER_IMPORT_ROOTS", _default_import_roots()),
        metavar="DIRS",
        help="Folders `sdserve models import` may read, ':'-separated; '' turns imports off "
        "(env SDSERVE_MANAGER_IMPORT_ROOTS; default: the current folder, unless it is /, and your home folder).",
    )
    p.add_argument("--no-manager", action="store_true", help="Serve --model-dirs only, without the sidecar.")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="Further `python -m service` flags after --.")
    p.set_defaults(func=cmd_serve)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The `sdserve` parser; defaults read SDSERVE_TARGET, SDSERVE_API_KEY and the sidecar's store variables."""
    env = os.environ if environ is None else environ
    parser = Parser(prog="sdserve", description="sdserve: Stable Diffusion over gRPC.")
    add_connection_flags(parser, env, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub, env)

    def client_command(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        add_connection_flags(p, env, top_level=False)
        return p

    p = client_command("generate", "Text-to-image.")
    _add_common(p)
    p.set_defaults(func=cmd_generate)

    p = client_command("edit", "Image-to-image.")
    _add_common(p)
    p.add_argument("--image", required=True, help="Input image (PNG, JPEG or WebP).")
    p.add_argument("--strength", type=float, help="How far to move from the input, (0, 1]; default 0.8.")
    p.set_defaults(func=cmd_edit)

    p = client_command("inpaint", "Repaint the white part of a mask.")
    _add_common(p)
    p.add_argument("--image", required=True, help="Input image.")
    p.add_argument("--mask", required=True, help="Mask image, same size: white = repaint.")
    p.add_argument("--strength", type=float, help="(0, 1]; default 1.")
    p.add_argument("--mask-blur", type=int, default=0, help="Mask edge blur in pixels.")
    p.add_argument("--invert-mask", action="store_true", help="Repaint the black part instead.")
    p.add_argument("--only-masked", action="store_true", help="Work on a padded box around the mask.")
    p.add_argument("--mask-padding", type=int, help="Padding around the mask box in pixels (default 32).")
    p.add_argument("--preserve-unmasked", action="store_true", help="Keep pixels outside the mask byte-exact.")
    p.set_defaults(func=cmd_inpaint)

    p = client_command("health", "Print the server's health; exit 0 when SERVING.")
    p.add_argument("--service", default="", help="Health service name ('' = overall readiness).")
    p.add_argument("--wait", type=float, default=0.0, help="Poll up to this many seconds for SERVING.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_health)

    p = client_command("info", "Server device, versions, schedulers and limits.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="Models: the model manager's store, and what the server serves.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    add_models_commands(msub)
    p = msub.add_parser("served", help="Models the server serves now, with their load state.")
    add_connection_flags(p, env, top_level=False)
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "server_args", None) and ns.server_args[:1] == ["--"]:
        ns.server_args = ns.server_args[1:]
    try:
        code: int = ns.func(ns)
        return code
    except SdserveError as err:
        sys.stderr.write(f"sdserve: error: {err.one_line()}\n")
        return 2 if err.code == "INVALID_ARGUMENT" else 1


if __name__ == "__main__":
    sys.exit(main())
