"""Builds a process's frozen settings dataclass from defaults, PREFIX_* environment variables and flags.

Shared by the server (service.settings, prefix SDSERVE_) and the sidecar (model_manager.settings, prefix
SDSERVE_MANAGER_), so both read configuration the same way and only their fields and checks differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar


class Checked(Protocol):
    def check(self) -> None: ...


S = TypeVar("S", bound=Checked)


def setting(
    default: Any,
    help: str,
    parse: Callable[[str], Any] = str,
    fallback_env: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """A settings field: its help text, how to parse a string, other variables read first, and whether its
    value is a secret (never shown in --help or logs)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "parse": parse, "fallback_env": fallback_env, "secret": secret}
    )


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def parse_list(value: str) -> tuple[str, ...]:
    """Comma-separated values, blanks dropped."""
    return tuple(k.strip() for k in value.split(",") if k.strip())


def parse_paths(value: str) -> tuple[Path, ...]:
    """':'-separated paths, ~ expanded."""
    return tuple(Path(p).expanduser() for p in value.split(os.pathsep) if p)


def build_parser(cls: type[Any], prefix: str, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field; every flag defaults to None so unset flags leave the environment and defaults alone."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        default = f.default
        shown = ":".join(str(p) for p in default) if isinstance(default, tuple) else default
        if f.metadata["secret"]:
            shown = "(none)"
        env = prefix + f.name.upper()
        if f.metadata["fallback_env"]:
            env += ", then " + ", ".join(f.metadata["fallback_env"])
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{f.metadata['help']} (env {env}; default {shown!s})",
        )
    return parser


def load(
    cls: type[S],
    prefix: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str] | None,
) -> S:
    """Defaults, then fallback variables, then PREFIX_<NAME> variables, then flags; then cls.check()."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    for f in fields:
        for key in (*f.metadata["fallback_env"], prefix + f.name.upper()):
            if key in environ:
                try:
                    values[f.name] = f.metadata["parse"](environ[key])
                except ValueError as exc:
                    raise SystemExit(f"{key}: {exc}") from None
    ns = parser.parse_args(list(argv) if argv is not None else [])
    for f in fields:
        raw = getattr(ns, f.name)
        if raw is not None:
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                parser.error(f"--{f.name.replace('_', '-')}: {exc}")
    settings = cls(**values)
    settings.check()
    return settings
