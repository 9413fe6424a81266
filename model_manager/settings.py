"""The sidecar's one settings object, built once from flags and SDSERVE_MANAGER_* environment variables."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from sdserve_core import config_source
from sdserve_core.config_source import parse_bool, parse_list, parse_paths, setting

PREFIX = "SDSERVE_MANAGER_"
DEFAULT_STORE = Path.home() / ".cache" / "sdserve" / "store"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)", re.IGNORECASE)


def parse_size(value: str) -> int:
    """Bytes from '123', '500M', '20GiB' or '1.5G' (powers of 1024)."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (for example 500M or 20GiB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the sidecar is configured with; see `python -m model_manager --help`."""

    store: Path = setting(  # noqa: RUF009 - _field wraps dataclasses.field; Path is immutable
        DEFAULT_STORE,
        "The model store folder, shared with the server (read-only there).",
        lambda v: Path(v).expanduser(),
    )
    read_only_store: bool = setting(
        False,
        "The store is a shared read-only volume populated once (docs/shared-store.md): nothing under it is written; "
        "pulls, imports, variants, removals and eviction are refused, declared models must already be in it, and the "
        "sidecar's own state goes to --state-dir.",
        parse_bool,
    )
    state_dir: str = setting(
        "",
        "Writable folder for the sidecar's own state (aliases.json, state.json, its lock). Empty: the store folder. "
        "Required with --read-only-store.",
    )
    host: str = setting("127.0.0.1", "Interface to listen on (0.0.0.0 for all).")
    port: int = setting(50052, "TCP port to listen on; 0 picks a free one; -1 turns TCP off.", int)
    unix_socket: str = setting("", "Also listen on this Unix socket path (empty: none).")
    port_file: str = setting("", "Write the bound TCP port to this file once serving.")
    import_roots: tuple[Path, ...] = setting(
        (),
        "Folders that ImportModel may read from, separated by ':'. Empty: imports over the API are refused.",
        parse_paths,
    )
    max_store_bytes: int = setting(
        0, "Disk budget for published models (for example 50GiB); 0 means no budget.", parse_size
    )
    min_free_bytes: int = setting(
        512 * 1024**2,
        "Free space to keep on the store's file system; pulls that would go below it evict or fail.",
        parse_size,
    )
    hf_endpoint: str = setting(
        "https://huggingface.co",
        "Hugging Face Hub endpoint (a mirror or a local test hub also works).",
        str,
        ("HF_ENDPOINT",),
    )
    hf_token: str = setting("", "Hub access token for gated or private repositories.", str, ("HF_TOKEN",), secret=True)
    offline: bool = setting(
        False,
        "Never contact the Hub; pulls are answered from the store.",
        parse_bool,
        ("HF_HUB_OFFLINE",),
    )
    hub_timeout: float = setting(
        10.0, "Seconds to wait for Hub metadata before treating the Hub as unreachable.", float
    )
    verify_on_start: str = setting(
        "full", "Re-verify stored models at start: full (sha256 of every file), size (sizes only) or off."
    )
    scrub_interval_seconds: float = setting(
        86400.0,
        "Seconds between scrubs, which read every stored file again and mark variants that no longer match their "
        "manifest CORRUPT; 0 turns scrubbing off.",
        float,
    )
    partial_max_age_hours: float = setting(
        168.0, "Partial downloads older than this many hours are deleted at start; 0 keeps them forever.", float
    )
    quality_check: bool = setting(True, "Measure each new variant's image PSNR against fp32.", parse_bool)
    quality_steps: int = setting(10, "Denoising steps of the quality images.", int)
    quality_size: int = setting(256, "Width and height of quality images in pixels; 0: the model's default.", int)
    quality_device: str = setting("cpu", "Device that renders quality images: cpu, cuda or cuda:N.")
    torch_threads: int = setting(0, "Torch intra-op threads; 0 leaves torch's default.", int)
    watch_queue: int = setting(1024, "Events a WatchModels subscriber may lag before its stream is aborted.", int)
    metrics_host: str = setting("127.0.0.1", "Interface for the Prometheus /metrics endpoint (0.0.0.0 in a pod).")
    metrics_port: int = setting(9401, "Port for /metrics; 0 picks a free one, -1 disables it.", int)
    api_keys: tuple[str, ...] = setting(
        (),
        "API keys accepted as 'authorization: Bearer KEY', comma-separated. Empty with no file: no auth.",
        parse_list,
        secret=True,
    )
    api_keys_file: str = setting("", "File with one API key per line (# comments allowed); adds to --api-keys.")
    tls_cert_file: str = setting("", "PEM certificate chain; with --tls-key-file the TCP port speaks TLS only.")
    tls_key_file: str = setting("", "PEM private key for --tls-cert-file.")
    tls_client_ca_file: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )
    declared_state: str = setting(
        "",
        "A declared-state YAML file (models, variants, adapters, aliases; see docs/declared-state.md) that the "
        "sidecar reconciles at start and whenever it changes. Empty: none.",
    )
    declared_poll_seconds: float = setting(
        5.0, "Seconds between checks of --declared-state for a change (path, inode, mtime, content hash).", float
    )
    declared_retry_seconds: float = setting(
        60.0, "Seconds before declared entries that failed are tried again with an unchanged file; 0: never.", float
    )
    log_format: str = setting("auto", "Log format: auto (JSON unless on a terminal), json or text.")
    log_level: str = setting("INFO", "Log level.")

    @staticmethod
    def from_sources(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Builds settings: defaults, then fallback variables (HF_*), then SDSERVE_MANAGER_* variables, then flags."""
        return config_source.load(Settings, PREFIX, build_parser(), argv, environ)

    def check(self) -> None:
        """Rejects settings that cannot work together."""
        problems = []
        if not -1 <= self.port <= 65535:
            problems.append("port must be -1 to 65535")
        if self.port == -1 and not self.unix_socket:
            problems.append("with port -1 a unix_socket is required")
        if self.read_only_store and not self.state_dir:
            problems.append(
                "read_only_store needs state_dir: a writable folder for the aliases and the sidecar's state"
            )
        if self.verify_on_start not in ("full", "size", "off"):
            problems.append("verify_on_start must be full, size or off")
        if self.max_store_bytes < 0 or self.min_free_bytes < 0:
            problems.append("max_store_bytes and min_free_bytes must not be negative")
        if self.quality_steps < 1:
            problems.append("quality_steps must be at least 1")
        if self.quality_size < 0 or self.quality_size % 8:
            problems.append("quality_size must be 0 or a positive multiple of 8")
        if self.scrub_interval_seconds < 0:
            problems.append("scrub_interval_seconds must be 0 (off) or positive")
        if self.watch_queue < 1:
            problems.append("watch_queue must be at least 1")
        if self.hub_timeout <= 0:
            problems.append("hub_timeout must be positive")
        if self.log_format not in ("auto", "json", "text"):
            problems.append("log_format must be auto, json or text")
        if not -1 <= self.metrics_port <= 65535:
            problems.append("metrics_port must be -1 (off), 0 (any) or a port")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.tls_cert_file and self.port == -1:
            problems.append("TLS applies to the TCP port (the Unix socket stays plaintext); with port -1 there is none")
        if self.declared_poll_seconds <= 0:
            problems.append("declared_poll_seconds must be positive")
        if self.declared_retry_seconds < 0:
            problems.append("declared_retry_seconds must be 0 (never) or positive")
        if problems:
            raise SystemExit("invalid settings: " + "; ".join(problems))

    def redacted(self) -> dict[str, object]:
        """Settings for the start-up log line, with secrets hidden."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = ("<set>" if value else "") if f.metadata["secret"] else str(value)
        return out


def build_parser() -> argparse.ArgumentParser:
    """The flag parser (every flag also reads SDSERVE_MANAGER_<NAME>)."""
    return config_source.build_parser(
        Settings,
        PREFIX,
        "python -m model_manager",
        "sdserve model-manager sidecar. Every flag also reads SDSERVE_MANAGER_<NAME> from the environment.",
    )
