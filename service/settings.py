"""The server's one settings object, built once from flags and SDSERVE_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from sdserve_core import config_source
from sdserve_core.config_source import parse_bool, parse_list, parse_paths, setting
from service.aliases import parse_weighted

if TYPE_CHECKING:
    from sdserve_core.memory import MemoryPolicy

PREFIX = "SDSERVE_"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The embedded models: package data in an installed server (pyproject.toml installs models/ as
# service/embedded_models), the repository's models/ folder in a checkout.
_PACKAGED_MODELS = Path(__file__).resolve().parent / "embedded_models"
EMBEDDED_MODELS = _PACKAGED_MODELS if _PACKAGED_MODELS.is_dir() else REPO_ROOT / "models"


def _default_model_dirs() -> tuple[Path, ...]:
    # The embedded models first, then the writable cache; missing ones are skipped.
    return (EMBEDDED_MODELS, Path.home() / ".cache" / "sdserve" / "models")


def _default_adapter_dirs() -> tuple[Path, ...]:
    # The embedded adapters first, then the writable cache; missing ones are skipped.
    return (EMBEDDED_MODELS / "adapters", Path.home() / ".cache" / "sdserve" / "adapters")


def _aliases(value: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"alias {item!r} is not NAME=TARGET")
        try:
            parse_weighted(target.strip())
        except ValueError as exc:
            raise ValueError(f"alias {name.strip()!r}: {exc}") from exc
        pairs.append((name.strip(), target.strip()))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the server is configured with; see `python -m service --help`."""

    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = setting(50051, "TCP port to listen on; 0 picks a free one.", int)
    port_file: str = setting("", "Write the bound port to this file once serving (useful with --port 0).")
    http_port: int = setting(
        -1,
        "HTTP port for Connect / gRPC-Web / JSON, the A1111-compatible REST API (/sdapi/v1), /openapi.json and "
        "the playground page (/); 0 picks a free one, -1 (the default) serves no HTTP. Same host, API keys and "
        "TLS files as gRPC. `sdserve serve` turns it on (8080).",
        int,
    )
    http_port_file: str = setting("", "Write the bound HTTP port to this file once serving (with --http-port 0).")
    model_dirs: tuple[Path, ...] = setting(
        _default_model_dirs(),
        "Folders holding model folders (diffusers layout), separated by ':'. "
        "Default: the embedded models (the repository's models/, or the installed server's copy) and "
        "~/.cache/sdserve/models.",
        parse_paths,
    )
    default_model: str = setting(
        "", "Model served when a request names none. Empty: 'shapes' if present, else the built-in tiny model."
    )
    aliases: tuple[tuple[str, str], ...] = setting(
        (),
        "Static aliases, NAME=TARGET,NAME=TARGET. A canary alias splits requests between models by weight: "
        "prod=a*90|b*10 (each request picks by its request id: one id always gets the same model).",
        _aliases,
    )
    manager_target: str = setting(
        "", "Model-manager sidecar to follow (host:port or unix:PATH); empty: serve --model-dirs only."
    )
    manager_wait_seconds: float = setting(
        30.0, "At start-up, how long to wait for the sidecar's first snapshot before serving without it.", float
    )
    wait_for_default_seconds: float = setting(
        0.0,
        "With --manager-target: at start-up, how long to stay NOT_SERVING waiting for the sidecar to publish the "
        "default model (--default-model, else its `default` alias; e.g. set by its declared state) before going on "
        "without it. 0: do not wait.",
        float,
    )
    manager_api_key: str = setting(
        "", "API key sent to the sidecar as 'authorization: Bearer KEY' (its --api-keys); empty: none.", secret=True
    )
    manager_ca_file: str = setting(
        "", "PEM CA bundle to verify the sidecar's certificate; setting it (or a client certificate) turns on TLS."
    )
    manager_client_cert_file: str = setting(
        "",
        "PEM client certificate chain presented to the sidecar when it requires mutual TLS.",
    )
    manager_client_key_file: str = setting("", "PEM private key for --manager-client-cert-file.")
    device: str = setting("auto", "Device: auto, cpu, cuda, cuda:N, mps or xpu.")
    dtype: str = setting("auto", "Model dtype: auto (fp16 on GPUs, fp32 on CPU), float32, float16 or bfloat16.")
    torch_threads: int = setting(0, "Torch intra-op threads; 0 leaves torch's default.", int)
    preload_default: bool = setting(True, "Load and warm the default model before reporting SERVING.", parse_bool)
    max_queue: int = setting(32, "Requests each model's queue holds; more get RESOURCE_EXHAUSTED.", int)
    default_max_queue_seconds: float = setting(
        0.0, "Default longest wait in the queue, in seconds; 0 means no limit.", float
    )
    max_batch_images: int = setting(
        8, "Most images one pipeline call may carry; the measured policy picks up to this (1 disables batching).", int
    )
    batch_wait_ms: float = setting(
        0.0,
        "Longest wait for more compatible requests before a short batch starts, in ms. 0: batch only what is "
        "already queued (requests that pile up behind a running call), which adds no latency.",
        float,
    )
    batch_policy: str = setting(
        "measured",
        "measured: per model and size, batch up to the size with the best measured per-image step time; "
        "fixed: always allow max_batch_images.",
    )
    calibrate_batching: bool = setting(
        True, "At start-up, time batch sizes 1, 2, 4, ... at the default model's size to seed the policy.", parse_bool
    )
    execution_profile: str = setting(
        "auto",
        "How fast requests run: auto (per model, measure the candidate profiles at load and keep the fastest that "
        "passes the quality guard), exact, or a fixed profile such as bf16-autocast+channels-last "
        "(docs/performance.md).",
    )
    profile_candidates: str = setting(
        "",
        "With execution_profile auto: the profiles to measure, comma-separated (exact is always measured). Empty: "
        "the device's own list (GPUs: channels-last, fp16/bf16 autocast over fp32 weights, each also compiled; "
        "CPUs: bf16 autocast only with AVX512-BF16 or AMX, else none).",
    )
    profile_min_psnr: float = setting(
        30.0,
        "Quality guard: a candidate profile is accepted only if every probe image is at least this PSNR (dB) "
        "against the exact profile's.",
        float,
    )
    precision: str = setting(
        "fast",
        "Precision of requests that name none: fast (the model's execution profile) or exact (the pipeline as "
        "diffusers runs it, bit for bit).",
    )
    replica: str = setting(
        "",
        "This server's name in a fleet, reported in StartedEvent.replica, the result's parameters and GetServerInfo. "
        "Empty: the host name (the pod name in Kubernetes).",
    )
    compile_cache_dir: str = setting(
        "",
        "Folder of torch.compile's kernel and graph cache, so restarts load compiled kernels (put it beside the "
        "model store in a pod). Empty: ~/.cache/sdserve/compile.",
    )
    adapter_dirs: tuple[Path, ...] = setting(
        _default_adapter_dirs(),
        "Folders holding adapter folders (adapter.safetensors + adapter.json; see docs/adapters.md), separated by "
        "':'; re-read when one changes. The sidecar's store adds its own. Default: the embedded adapters "
        "(models/adapters) and ~/.cache/sdserve/adapters.",
        parse_paths,
    )
    adapter_pool_bytes: int = setting(
        1024 * 1024 * 1024,
        "Bytes of LoRA weights kept loaded in models (least recently used unloaded first; a batch's own are kept).",
        int,
    )
    max_adapters: int = setting(8, "Most LoRA adapters per request.", int)
    prompt_cache_bytes: int = setting(
        64 * 1024 * 1024, "Bytes of text-encoder outputs kept in the LRU prompt cache; 0 disables it.", int
    )
    vae_tiling: str = setting(
        "auto",
        "VAE tiling (decode in overlapping tiles): auto (at vae_tiling_min_pixels or more, or when the device's "
        "free memory cannot hold a whole-image decode), on or off. See docs/memory.md.",
    )
    vae_tiling_min_pixels: int = setting(
        1536 * 1536, "With vae_tiling auto: tile requests of at least this many output pixels (width x height).", int
    )
    vae_slicing: str = setting(
        "auto", "VAE slicing (decode a batch one image at a time): auto (batches that tile or lack memory), on or off."
    )
    attention_slicing: str = setting(
        "auto", "Attention slicing: auto (only where torch lacks scaled_dot_product_attention), on or off."
    )
    cpu_offload: str = setting(
        "auto",
        "Model CPU offload (components on the device only while they run): auto (when the device's free memory "
        "cannot hold the model), on or off. Never on a CPU device.",
    )
    min_size: int = setting(8, "Smallest width/height in pixels.", int)
    max_size: int = setting(2048, "Largest width/height in pixels.", int)
    max_input_pixels: int = setting(4096 * 4096, "Largest input image/mask in pixels (decompression bombs).", int)
    max_image_bytes: int = setting(32 * 1024 * 1024, "Largest encoded input image or mask in bytes.", int)
    max_steps: int = setting(150, "Most denoising steps per request.", int)
    max_images: int = setting(4, "Most images per request.", int)
    max_prompt_chars: int = setting(2000, "Longest prompt or negative prompt in characters.", int)
    max_message_bytes: int = setting(64 * 1024 * 1024, "Largest gRPC message sent or received, in bytes.", int)
    metrics_host: str = setting("127.0.0.1", "Interface for the Prometheus /metrics endpoint (0.0.0.0 in a pod).")
    metrics_port: int = setting(9400, "Port for /metrics; 0 picks a free one, -1 disables it.", int)
    grace_seconds: float = setting(
        60.0, "On SIGTERM: how long in-flight streams may run before they are cancelled (UNAVAILABLE).", float
    )
    api_keys: tuple[str, ...] = setting(
        (),
        "API keys accepted as 'authorization: Bearer KEY', comma-separated. Empty with no file: no auth.",
        parse_list,
        secret=True,
    )
    api_keys_file: str = setting("", "File with one API key per line (# comments allowed); adds to --api-keys.")
    tls_cert_file: str = setting("", "PEM certificate chain; with --tls-key-file the server speaks TLS only.")
    tls_key_file: str = setting("", "PEM private key for --tls-cert-file.")
    tls_client_ca_file: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )
    keepalive_time_s: float = setting(60.0, "Server keepalive ping interval on idle connections, seconds.", float)
    keepalive_timeout_s: float = setting(20.0, "How long to wait for a keepalive ack before closing, seconds.", float)
    max_connection_age_s: float = setting(
        0.0, "Close connections older than this (seconds) so clients rebalance; 0 keeps them forever.", float
    )
    max_connection_age_grace_s: float = setting(
        900.0, "After max_connection_age, how long open streams may finish; keep above the longest generation.", float
    )
    max_concurrent_streams: int = setting(64, "Most concurrent streams (RPCs) per client connection.", int)
    log_format: str = setting("auto", "Log format: auto (JSON unless on a terminal), json or text.")
    log_level: str = setting("INFO", "Log level.")

    @staticmethod
    def from_sources(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds settings: defaults, overridden by SDSERVE_* variables, overridden by flags."""
        return config_source.load(Settings, PREFIX, build_parser(), argv, environ)

    def check(self) -> None:
        """Rejects settings that cannot work together."""
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append("port must be 0 to 65535")
        if self.min_size < 8 or self.min_size % 8 or self.max_size < self.min_size:
            problems.append("min_size must be a multiple of 8, at least 8, and not above max_size")
        for name in ("max_queue", "max_steps", "max_images", "max_prompt_chars", "max_batch_images", "max_adapters"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_message_bytes < 4 * 1024 * 1024:
            problems.append("max_message_bytes must be at least 4 MiB")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if bool(self.manager_client_cert_file) != bool(self.manager_client_key_file):
            problems.append("manager_client_cert_file and manager_client_key_file go together")
        manager_tls = self.manager_ca_file or self.manager_client_cert_file
        if manager_tls and self.manager_target.startswith("unix:"):
            problems.append(
                "the sidecar's Unix socket is plaintext: manager_ca_file and manager_client_cert_file "
                "need a host:port manager_target"
            )
        if not -1 <= self.http_port <= 65535:
            problems.append("http_port must be -1 (off), 0 (any) or a port")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            problems.append("metrics_port must be -1 (off), 0 (any) or a port")
        if self.batch_policy not in ("measured", "fixed"):
            problems.append("batch_policy must be measured or fixed")
        for name in ("vae_tiling", "vae_slicing", "attention_slicing", "cpu_offload"):
            if getattr(self, name) not in ("auto", "on", "off"):
                problems.append(f"{name} must be auto, on or off")
        if self.vae_tiling_min_pixels < 1:
            problems.append("vae_tiling_min_pixels must be at least 1")
        if self.wait_for_default_seconds < 0 or (self.wait_for_default_seconds and not self.manager_target):
            problems.append("wait_for_default_seconds must be 0 or more, and needs manager_target")
        if self.precision not in ("fast", "exact"):
            problems.append("precision must be fast or exact")
        problems += _profile_problems(self)
        if self.log_format not in ("auto", "json", "text"):
            problems.append("log_format must be auto, json or text")
        if problems:
            raise SystemExit("invalid settings: " + "; ".join(problems))


def _profile_problems(s: Settings) -> list[str]:
    """What is wrong with the execution-profile settings (profile names parsed by sdserve_core.profiles)."""
    from sdserve_core import profiles

    problems = []
    if s.execution_profile != "auto":
        try:
            profiles.parse(s.execution_profile)
        except ValueError as exc:
            problems.append(f"execution_profile: {exc}")
    for name in filter(None, (n.strip() for n in s.profile_candidates.split(","))):
        try:
            profiles.parse(name)
        except ValueError as exc:
            problems.append(f"profile_candidates: {exc}")
    if not 0 < s.profile_min_psnr < 200:
        problems.append("profile_min_psnr must be above 0 and below 200 dB")
    return problems


def memory_policy(s: Settings) -> MemoryPolicy:
    """The memory settings as sdserve_core.memory takes them (imported here: it imports torch)."""
    from sdserve_core.memory import MemoryPolicy, Mode

    return MemoryPolicy(
        vae_tiling=cast(Mode, s.vae_tiling),
        vae_tiling_min_pixels=s.vae_tiling_min_pixels,
        vae_slicing=cast(Mode, s.vae_slicing),
        attention_slicing=cast(Mode, s.attention_slicing),
        cpu_offload=cast(Mode, s.cpu_offload),
    )


def build_parser() -> argparse.ArgumentParser:
    """The flag parser (every flag also reads SDSERVE_<NAME>)."""
    return config_source.build_parser(
        Settings,
        PREFIX,
        "python -m service",
        "sdserve inference server. Every flag also reads SDSERVE_<NAME> from the environment.",
    )
