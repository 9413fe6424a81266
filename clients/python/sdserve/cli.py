"""The `sdserve` command: serve, generate, edit, inpaint, models and info."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from sdserve.client import Client, Stream
from sdserve.errors import SdserveError
from sdserve.models_cli import add_models_commands
from sdserve.types import SCHEDULER_NAMES as SCHEDULERS
from sdserve.types import GenerationOptions, Progress, Queued, Result, Started


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


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SdserveError("INVALID_ARGUMENT", f"{flag}: cannot read {path}: {exc.strerror}") from None


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
    return opts  # type: ignore[return-value]


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
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        for ev in stream:
            if isinstance(ev, Queued):
                bar.status(f"queued at position {ev.position}")
            elif isinstance(ev, Started):
                bar.status(f"started on {ev.model}@{ev.model_revision[:10]} seeds {list(ev.seeds)}")
                bar.done()
            elif isinstance(ev, Progress):
                for p in ev.previews:
                    if preview_dir is not None:
                        ext = "jpg" if p.format == "jpeg" else p.format
                        (preview_dir / f"step-{ev.step:04d}-{p.index}.{ext}").write_bytes(p.data)
                bar.show(ev.step, ev.total_steps)
            elif isinstance(ev, Result):
                bar.done()
                for img, path in zip(ev.images, _out_paths(ns.out, len(ev.images)), strict=True):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    img.save(str(path))
                    print(f"{path} seed={img.seed} {img.width}x{img.height} {ev.timings.total:.2f}s")
                return 0
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.done()
    raise SdserveError("UNKNOWN", "the stream ended without a result")


def _client(ns: argparse.Namespace) -> Client:
    return Client(ns.target, api_key=ns.api_key or None)


def cmd_generate(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        return _run_stream(c.stream_generate(ns.prompt, timeout=ns.timeout, **_options(ns)), ns)


def cmd_edit(ns: argparse.Namespace) -> int:
    image = _read(ns.image, "--image")
    with _client(ns) as c:
        stream = c.stream_edit(image, ns.prompt, strength=ns.strength, timeout=ns.timeout, **_options(ns))
        return _run_stream(stream, ns)


def cmd_inpaint(ns: argparse.Namespace) -> int:
    image = _read(ns.image, "--image")
    mask = _read(ns.mask, "--mask")
    with _client(ns) as c:
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


def cmd_info(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        print(c.server_info())
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        models, default = c.list_models()
    for m in models:
        mark = "*" if m.name == default else " "
        aliases = f" aliases={','.join(m.aliases)}" if m.aliases else ""
        print(f"{mark} {m.name:24} {m.state:8} rev={m.revision[:12]} {m.variant:5} tasks={','.join(m.tasks)}{aliases}")
    return 0


def cmd_health(ns: argparse.Namespace) -> int:
    """Checks grpc.health.v1; with --wait, polls until SERVING or the wait runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + ns.wait
    with grpc.insecure_channel(ns.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=ns.service), timeout=5)
                state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                state = err.code().name
            if state == "SERVING" or time.monotonic() >= deadline:
                print(state)
                return 0 if state == "SERVING" else 1
            time.sleep(0.5)


def cmd_serve(ns: argparse.Namespace) -> int:
    """Starts the model-manager sidecar and the server, and stops both on Ctrl-C or SIGTERM."""
    children: list[subprocess.Popen[bytes]] = []
    args = [sys.executable, "-m", "service", "--port", str(ns.port), "--host", ns.host]
    if ns.model:
        args += ["--default-model", ns.model]
    if ns.model_dirs:
        args += ["--model-dirs", ns.model_dirs]
    if ns.metrics_port is not None:
        args += ["--metrics-port", str(ns.metrics_port)]
    if not ns.no_manager:
        store = os.path.expanduser(ns.store)
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "model_manager",
                    "--store",
                    store,
                    "--port",
                    str(ns.manager_port),
                    "--host",
                    "127.0.0.1",
                ]
            )
        )
        args += ["--manager-target", f"127.0.0.1:{ns.manager_port}"]
    args += ns.server_args
    children.append(subprocess.Popen(args))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # The server drains first; the sidecar goes once the server has stopped.
    server_code = children[-1].wait()
    for child in children[:-1]:
        if child.poll() is None:
            child.terminate()
    codes = [server_code] + [child.wait() for child in children[:-1]]
    return max(codes, key=abs)


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
    p.add_argument("--preview-dir", help="Write previews into this folder as they arrive.")
    p.add_argument("--preview", choices=("latent_rgb", "full_vae"), default="latent_rgb", help="Preview kind.")
    p.add_argument("--preview-every", type=int, default=1, help="Preview every N steps.")
    p.add_argument("--request-id", default="", help="Request id echoed in the result and server logs.")
    p.add_argument("--timeout", type=float, help="Deadline in seconds.")
    p.add_argument("--quiet", action="store_true", help="No progress output.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve", description="sdserve: Stable Diffusion over gRPC.")
    parser.add_argument(
        "--target", default=os.environ.get("SDSERVE_TARGET", "127.0.0.1:50051"), help="Server address host:port."
    )
    parser.add_argument("--api-key", default=os.environ.get("SDSERVE_API_KEY", ""), help="API key (bearer token).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="Start the server on this machine (Ctrl-C or SIGTERM stops it).")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="", help="Default model (default: the embedded model).")
    p.add_argument("--model-dirs", default="", help="Model folders, ':'-separated.")
    p.add_argument("--metrics-port", type=int, help="Server /metrics port (default 9400; -1 off).")
    p.add_argument("--store", default="~/.cache/sdserve/store", help="The model manager's store folder.")
    p.add_argument("--manager-port", type=int, default=50052, help="The model manager's port (127.0.0.1).")
    p.add_argument("--manager-metrics-port", type=int, default=9401, help="The sidecar's /metrics port (-1 off).")
    p.add_argument("--no-manager", action="store_true", help="Serve --model-dirs only, without the sidecar.")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="Further `python -m service` flags after --.")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="Text-to-image.")
    _add_common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="Image-to-image.")
    _add_common(p)
    p.add_argument("--image", required=True, help="Input image (PNG, JPEG or WebP).")
    p.add_argument("--strength", type=float, help="How far to move from the input, (0, 1]; default 0.8.")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("inpaint", help="Repaint the white part of a mask.")
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

    p = sub.add_parser("health", help="Print the server's health; exit 0 when SERVING.")
    p.add_argument("--service", default="", help="Health service name ('' = overall readiness).")
    p.add_argument("--wait", type=float, default=0.0, help="Poll up to this many seconds for SERVING.")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("info", help="Server device, versions and limits.")
    p.set_defaults(func=cmd_info)

    models = sub.add_parser("models", help="Models: the model manager's store, and what the server serves.")
    msub = models.add_subparsers(dest="models_command", required=True)
    add_models_commands(msub)
    p = msub.add_parser("served", help="Models the server serves now, with their load state.")
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
