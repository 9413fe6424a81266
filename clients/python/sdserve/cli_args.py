"""Shared argparse pieces of the sdserve CLI: one-line usage errors and the server connection flags."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from sdserve.client import Client
from sdserve.errors import FieldViolation, SdserveError
from sdserve.fleet import SERVICE_CONFIG, RetryPolicy, fleet_target
from sdserve.types import MAX_ADAPTER_SCALE, CropOffset, ImageSize

DEFAULT_TARGET = "127.0.0.1:50051"
# gRPC's resolver schemes: a target starting with one is passed on as it is.
_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
# The contract's bounds for micro-conditioning sizes (1 to 16384 per side) and crop offsets (0 to 16384).
MAX_SIDE = 16384
_SIZE = re.compile(r"([0-9]+)x([0-9]+)")
_CROP = re.compile(r"([0-9]+),([0-9]+)")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line ("sdserve generate: error: ...") and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def flag_error(flag: str, rule: str) -> SdserveError:
    """A bad command-line value: printed as one line, '--flag: rule', exit status 2."""
    return SdserveError("INVALID_ARGUMENT", f"{flag}: {rule}", (FieldViolation(flag, rule),))


def image_size(text: str) -> ImageSize:
    """An argparse type: WIDTHxHEIGHT in pixels, each 1 to 16384 (argparse names the flag in its error)."""
    m = _SIZE.fullmatch(text)
    if m is None or not all(1 <= int(v) <= MAX_SIDE for v in m.groups()):
        raise argparse.ArgumentTypeError(
            f"must be WIDTHxHEIGHT in pixels, each 1 to {MAX_SIDE} (for example 1024x768), got {text!r}"
        )
    return ImageSize(int(m[1]), int(m[2]))


def crop_offset(text: str) -> CropOffset:
    """An argparse type: TOP,LEFT in pixels, each 0 to 16384."""
    m = _CROP.fullmatch(text)
    if m is None or not all(int(v) <= MAX_SIDE for v in m.groups()):
        raise argparse.ArgumentTypeError(
            f"must be TOP,LEFT in pixels, each 0 to {MAX_SIDE} (for example 0,256), got {text!r}"
        )
    return CropOffset(int(m[1]), int(m[2]))


def lora(text: str) -> tuple[str, float | None]:
    """An argparse type: NAME or NAME:SCALE, SCALE a number from -4 to 4 (absent: the server's default, 1)."""
    name, colon, scale_text = text.partition(":")
    rule = f"must be NAME or NAME:SCALE with SCALE from {-MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g}"
    if not name.strip():
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r} (no NAME)")
    if not colon:
        return name, None
    try:
        scale = float(scale_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r} (SCALE is not a number)") from None
    if not math.isfinite(scale) or not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return name, scale


class LoraAction(argparse.Action):
    """Appends each --lora NAME[:SCALE]; naming one adapter twice is a usage error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        entries: list[tuple[str, float | None]] = list(getattr(namespace, self.dest, None) or [])
        assert isinstance(values, tuple), values  # lora() made it
        name, scale = values
        if any(name == seen for seen, _ in entries):
            raise argparse.ArgumentError(self, f"names {name!r} twice (each adapter once, with one scale)")
        entries.append((name, scale))
        setattr(namespace, self.dest, entries)


def read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise flag_error(flag, f"cannot read {path}: {exc.strerror or exc}") from None


def add_connection_flags(p: argparse.ArgumentParser, environ: Mapping[str, str], *, top_level: bool) -> None:
    """--target, --api-key and the TLS flags. They go before the command (`sdserve --target X info`) or after it
    (`sdserve info --target X`); after it wins. Only the top level holds defaults, so an absent flag after the
    command leaves the one before it alone."""

    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    g = p.add_argument_group("connection to the server (before or after the command)")
    g.add_argument(
        "--target",
        default=default(environ.get("SDSERVE_TARGET", DEFAULT_TARGET)),
        metavar="HOST:PORT",
        help=f"Server address (env SDSERVE_TARGET; default {DEFAULT_TARGET}); several replicas as IP:PORT,IP:PORT,... "
        "or dns:///NAME:PORT (with --balance).",
    )
    g.add_argument(
        "--balance",
        action="store_true",
        default=default(False),
        help="Balance over every replica the target names (round robin) and retry a call that fails UNAVAILABLE, "
        "with the same request id and seed (docs/fleet.md).",
    )
    g.add_argument(
        "--api-key",
        default=default(environ.get("SDSERVE_API_KEY", "")),
        metavar="KEY",
        help="API key, sent as 'authorization: Bearer KEY' (env SDSERVE_API_KEY).",
    )
    g.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="Connect with TLS, trusting the system's roots (implied by every other --tls-* flag).",
    )
    g.add_argument("--tls-ca-file", default=default(""), metavar="PEM", help="Roots to trust instead of the system's.")
    g.add_argument(
        "--tls-cert-file",
        "--tls-client-cert-file",
        dest="tls_cert_file",
        default=default(""),
        metavar="PEM",
        help="Client certificate chain, for a server that requires mutual TLS (with --tls-key-file).",
    )
    g.add_argument(
        "--tls-key-file",
        "--tls-client-key-file",
        dest="tls_key_file",
        default=default(""),
        metavar="PEM",
        help="Private key of --tls-cert-file.",
    )
    g.add_argument(
        "--tls-server-name",
        default=default(""),
        metavar="NAME",
        help="Name to verify in the server's certificate (default: the host in --target).",
    )


def credentials(ns: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the connection flags; None for plaintext."""
    if bool(ns.tls_cert_file) != bool(ns.tls_key_file):
        given, missing = ("--tls-cert-file", "--tls-key-file")[:: 1 if ns.tls_cert_file else -1]
        raise flag_error(given, f"needs {missing} too (a client certificate goes with its key)")
    if not (ns.tls or ns.tls_ca_file or ns.tls_cert_file or ns.tls_server_name):
        return None
    root = read_file(ns.tls_ca_file, "--tls-ca-file") if ns.tls_ca_file else None
    cert = read_file(ns.tls_cert_file, "--tls-cert-file") if ns.tls_cert_file else None
    key = read_file(ns.tls_key_file, "--tls-key-file") if ns.tls_key_file else None
    return grpc.ssl_channel_credentials(root, key, cert)


def connect(ns: argparse.Namespace) -> Client:
    """A Client for the server named by the connection flags."""
    target = ns.target.strip()
    if not target:
        raise flag_error("--target", "must be HOST:PORT (or SDSERVE_TARGET), got an empty value")
    if "," in target and not _has_scheme(target):
        try:
            target = fleet_target(target.split(","))
        except ValueError as exc:
            raise flag_error("--target", str(exc).removeprefix("fleet_target: ")) from None
    return Client(
        target,
        api_key=ns.api_key or None,
        credentials=credentials(ns),
        tls_server_name=ns.tls_server_name or None,
        service_config=SERVICE_CONFIG if ns.balance else None,
        retry=RetryPolicy() if ns.balance else None,
    )


def _has_scheme(target: str) -> bool:
    """Whether a gRPC target names its resolver (dns:, ipv4:, ...) rather than being a list of HOST:PORT."""
    return target.partition(":")[0].lower() in _SCHEMES
