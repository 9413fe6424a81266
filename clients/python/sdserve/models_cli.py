"""`sdserve models ...` commands for the model-manager sidecar: pull, import, quantize, alias, list, show, rm, and
`adapters list|show|import|pull|rm`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from sdserve.cli_args import Parser
from sdserve.errors import SdserveError
from sdserve.models_client import (
    DEFAULT_TARGET,
    AdapterResult,
    AdapterStream,
    Alias,
    AliasRemoved,
    AliasSet,
    DeclaredEntry,
    DeclaredStatus,
    ModelCorrupted,
    ModelManagerClient,
    ModelPublished,
    ModelRemoved,
    OperationProgress,
    OperationResult,
    OperationStream,
    Snapshot,
    StoredAdapter,
    StoredModel,
    tls_credentials,
)

VARIANTS = ("fp32", "fp16", "bf16", "int8")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def parse_target(value: str) -> tuple[str, str, str]:
    """'NAME[@REVISION][:VARIANT]' -> (name, revision, variant); empty parts mean 'default'."""
    rest, _, variant = value.partition(":")
    name, _, revision = rest.partition("@")
    if variant and variant not in VARIANTS:
        raise SdserveError("INVALID_ARGUMENT", f"target: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return name, revision, variant


class TransferBar:
    """Progress of a long operation on one line (a terminal) or one line per stage (a pipe or file)."""

    def __init__(self, out: TextIO, enabled: bool):
        self.out = out
        self.enabled = enabled
        self.tty = enabled and out.isatty()
        self._stage: tuple[str, str] = ("", "")
        self._start = time.monotonic()
        self._base = 0
        self._width = 0

    def update(self, p: OperationProgress) -> None:
        if not self.enabled:
            return
        if (p.stage, p.message) != self._stage:
            if self.tty and self._width:
                self.out.write("\n")
            self._stage = (p.stage, p.message)
            self._start = time.monotonic()
            self._base = p.resumed_bytes
            self._width = 0
            if not self.tty:
                note = f" ({p.message})" if p.message else ""
                total = f" {human_bytes(p.total_bytes)}" if p.total_bytes else ""
                self.out.write(f"{p.stage}{total}{note}\n")
                self.out.flush()
                return
        if not self.tty:
            return
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = max(p.done_bytes - self._base, 0) / elapsed
        line = f"{p.stage:<11}"
        if p.total_bytes:
            filled = int(30 * min(p.done_bytes / p.total_bytes, 1.0))
            line += f" [{'#' * filled}{'.' * (30 - filled)}] {human_bytes(p.done_bytes)} / {human_bytes(p.total_bytes)}"
            line += f"  {human_bytes(rate)}/s"
        if p.resumed_bytes:
            line += f"  ({human_bytes(p.resumed_bytes)} resumed)"
        if p.file:
            line += f"  {p.file}"
        elif p.message:
            line += f"  {p.message}"
        self.out.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
        self._width = 0


def _client(ns: argparse.Namespace) -> ModelManagerClient:
    credentials = None
    if ns.manager_tls or ns.manager_tls_ca_file or ns.manager_tls_cert_file:
        try:
            credentials = tls_credentials(ns.manager_tls_ca_file, ns.manager_tls_cert_file, ns.manager_tls_key_file)
        except OSError as exc:
            raise SdserveError("INVALID_ARGUMENT", f"cannot read a TLS file: {exc}") from None
    return ModelManagerClient(ns.manager, api_key=ns.manager_api_key or None, credentials=credentials)


def _quality(m: StoredModel) -> str:
    if m.quality is None:
        return "-"
    return f"{m.quality.psnr_db:.1f} dB" if m.quality.psnr_db is not None else "-"


def _plain(value: Any) -> Any:
    """A dataclass as a dict (None and other values unchanged), for JSON output."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _as_json(value: Any) -> str:
    return json.dumps(_plain(value), indent=2, default=str)


def _run_operation(stream: OperationStream, ns: argparse.Namespace, verb: str) -> int:
    bar = TransferBar(sys.stderr, not ns.quiet)
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        result: OperationResult = stream.result(bar.update)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.done()
    if getattr(ns, "json", False):
        print(_as_json(result))
        return 0
    m = result.model
    notes = []
    if result.already_present:
        notes.append("already in the store")
    if result.offline:
        notes.append("offline: the Hub was unreachable, answered from the store")
    if result.downloaded_bytes:
        notes.append(f"{human_bytes(result.downloaded_bytes)} downloaded")
    if result.resumed_bytes:
        notes.append(f"{human_bytes(result.resumed_bytes)} resumed")
    if m.quality is not None and m.quality.psnr_db is not None:
        notes.append(f"PSNR {m.quality.psnr_db:.1f} dB vs fp32")
    print(f"{verb} {m.label()} ({human_bytes(m.size_bytes)}{'; ' + '; '.join(notes) if notes else ''})")
    print(f"  {m.path}")
    for other in result.also_published:
        print(f"also published {other.label()} ({human_bytes(other.size_bytes)})")
    for gone in result.evicted:
        print(f"evicted {gone.label()} ({human_bytes(gone.size_bytes)}) to make room")
    return 0


def cmd_pull(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        stream = c.stream_pull(ns.repo_id, revision=ns.revision, variant=ns.variant, name=ns.name)
        return _run_operation(stream, ns, "pulled")


def cmd_import(ns: argparse.Namespace) -> int:
    path = os.path.abspath(ns.path)
    with _client(ns) as c:
        stream = c.stream_import(path, name=ns.name, architecture=ns.architecture, config_from=ns.config_from)
        return _run_operation(stream, ns, "imported")


def cmd_quantize(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        measure = False if ns.no_quality else None
        stream = c.stream_create_variant(ns.name, ns.to, revision=ns.revision, measure_quality=measure)
        return _run_operation(stream, ns, "made")


def parse_weighted_targets(values: list[str]) -> list[tuple[str, str, str, int]]:
    """'NAME[@REVISION][:VARIANT]*WEIGHT' each -> (name, revision, variant, weight): a canary alias's targets."""
    out = []
    for value in values:
        target, star, weight = value.rpartition("*")
        if not star or not weight.isdigit() or int(weight) < 1:
            raise SdserveError(
                "INVALID_ARGUMENT",
                f"target: {value!r} is not NAME[@REVISION][:VARIANT]*WEIGHT with a weight of 1 or more",
            )
        out.append((*parse_target(target), int(weight)))
    return out


def cmd_alias_set(ns: argparse.Namespace) -> int:
    if len(ns.target) > 1:
        targets = parse_weighted_targets(ns.target)
        with _client(ns) as c:
            alias, previous = c.set_alias(ns.alias, targets=targets)
    else:
        name, revision, variant = parse_target(ns.target[0])
        with _client(ns) as c:
            alias, previous = c.set_alias(ns.alias, name, revision=revision, variant=variant)
    if ns.json:
        print(_as_json({"alias": dataclasses.asdict(alias), "previous": _plain(previous)}))
        return 0
    before = f" (was {_alias_target(previous)})" if previous is not None else ""
    print(f"{alias.name} -> {_alias_target(alias)}{before}")
    return 0


def cmd_alias_rm(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        alias = c.delete_alias(ns.alias)
    if ns.json:
        print(_as_json({"removed": dataclasses.asdict(alias)}))
        return 0
    print(f"removed alias {alias.name} (was {_alias_target(alias)})")
    return 0


def _alias_target(a: Alias) -> str:
    if a.targets:
        return " | ".join(t.label() for t in a.targets)
    return f"{a.model}@{a.revision[:12]}:{a.variant}"


def _alias_failure(a: Alias) -> str:
    """'' or one line: the alias's last failed target, why, and whether the alias went back."""
    f = a.last_failure
    if f is None:
        return ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.at))
    outcome = "went back to the previous target" if f.reverted else "the alias did not move"
    return f"  last failure {when}: {f.target.label()} ({f.reporter}; {outcome}): {f.reason}"


def cmd_list(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        listing = c.list(ns.name)
    if ns.json:
        print(_as_json(listing))
        return 0
    print(
        f"{'NAME':<28} {'REVISION':<12}  {'VARIANT':<7} {'FAMILY':<6} {'SIZE':>10}  {'STATE':<7} {'PSNR':>8}  "
        f"{'TASKS':<24} ALIASES"
    )
    for m in listing.models:
        aliases = ",".join(m.aliases) + (" (pinned)" if m.pinned else "")
        if m.lease_holders:
            aliases += f" (loaded by {m.lease_holders} server(s))"
        print(
            f"{m.name:<28} {m.revision[:12]:<12}  {m.variant:<7} {m.family or '-':<6} {human_bytes(m.size_bytes):>10}  "
            f"{m.state:<7} {_quality(m):>8}  {','.join(m.tasks) or '-':<24} {aliases}"
        )
    for a in listing.aliases:
        print(f"alias {a.name} -> {_alias_target(a)}{'' if a.path else '  (target missing)'}")
        if a.last_failure is not None:
            print(_alias_failure(a))
    u = listing.usage
    budget = f" of {human_bytes(u.budget_bytes)} budget" if u.budget_bytes else ""
    print(
        f"store {u.store_path}{' (read-only)' if u.read_only else ''}: {human_bytes(u.used_bytes)} used{budget}, "
        f"{human_bytes(u.protected_bytes)} protected, {human_bytes(u.filesystem_free_bytes)} free on disk"
    )
    if listing.declared is not None:
        for line in declared_lines(listing.declared):
            print(line)
    return 0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "never"


def declared_lines(d: DeclaredStatus) -> list[str]:
    """The declared state in a few lines: where it stands, then every entry that is not ready, and why."""
    ready = sum(1 for e in d.entries if e.state == "ready")
    state = "converged" if d.converged else "running" if d.running else "not converged"
    lines = [
        f"declared state {d.path}: {state}, {ready} of {len(d.entries)} entries ready (content "
        f"{d.sha256[:12] or 'none'}, last pass {_when(d.last_pass_at)}, last success {_when(d.last_success_at)})"
    ]
    if d.file_error:
        lines.append(f"  file not applied: {d.file_error}")
    if d.activity:
        lines.append(f"  now: {d.activity}")
    lines += [_entry_line(e) for e in d.entries if e.state != "ready"]
    return lines


def _entry_line(e: DeclaredEntry) -> str:
    why = f": {e.reason}" if e.reason else ""
    held = f" ({e.detail})" if e.detail else ""
    return f"  {e.state:<7} {e.entry} {e.name}{held}{why}"


def cmd_show(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        details = c.get(ns.name)
    if ns.json:
        print(_as_json(details))
        return 0
    for m in details.variants:
        print(f"{m.label()}  {m.state}{'  ' + m.error if m.error else ''}")
        print(f"  path         {m.path}")
        print(f"  size         {human_bytes(m.size_bytes)} ({m.size_bytes} bytes, {len(m.files)} files)")
        print(f"  description  {m.description}")
        src = m.source
        origin = {
            "hub": f"hub {src.repo_id}@{src.requested_revision} (commit {src.commit})",
            "local_folder": f"folder {src.path}",
            "single_file": f"single file {src.path} ({src.architecture})",
            "derived": f"made from {src.derived_from} ({src.repo_id or src.path})",
        }.get(src.kind, src.kind)
        print(f"  source       {origin}")
        if m.quality is not None:
            q = m.quality
            if q.psnr_db is not None:
                print(
                    f"  quality      PSNR {q.psnr_db:.2f} dB vs fp32 (seed {q.seed}, {q.steps} steps, "
                    f"{q.width}x{q.height}, {q.device})"
                )
            else:
                print(f"  quality      {q.note}")
        print(f"  family       {m.family or 'unknown'}")
        print(f"  tasks        {', '.join(m.tasks) or 'none (the folder cannot be read)'}")
        print(f"  unet         {m.unet_in_channels} input channels{' (inpainting)' if m.unet_in_channels == 9 else ''}")
        print(f"  created      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.created_at))}")
        print(f"  last used    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.last_used_at))}")
        print(f"  pinned       {'yes' if m.pinned else 'no'}; aliases: {', '.join(m.aliases) or 'none'}")
        if m.lease_holders:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.lease_expires_at))
            print(f"  loaded by    {m.lease_holders} server(s), lease until {until} (not evicted)")
        if ns.files:
            for f in m.files:
                print(f"    {f.sha256[:16]}  {f.size_bytes:>12}  {f.path}")
    for a in details.aliases:
        print(f"alias {a.name} -> {_alias_target(a)}")
        if a.last_failure is not None:
            print(_alias_failure(a))
    if details.declared:
        print("declared")
        for e in details.declared:
            print(_entry_line(e))
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    name, revision, variant = parse_target(ns.target)
    with _client(ns) as c:
        removed, freed = c.delete(name, revision=revision, variant=variant)
    if ns.json:
        print(_as_json({"removed": [dataclasses.asdict(m) for m in removed], "freed_bytes": freed}))
        return 0
    for m in removed:
        print(f"removed {m.label()}")
    print(f"freed {human_bytes(freed)}")
    return 0


def cmd_pin(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        c.pin(ns.name, ns.pinned)
    print(f"{'pinned' if ns.pinned else 'unpinned'} {ns.name}")
    return 0


def cmd_watch(ns: argparse.Namespace) -> int:
    with _client(ns) as c, c.watch() as stream:
        signal.signal(signal.SIGINT, lambda *_: stream.cancel())
        for ev in stream:
            if ns.json:
                # One object per line, so a consumer can read events as they come.
                print(json.dumps({"event": type(ev).__name__, **_plain(ev)}, default=str), flush=True)
                continue
            if isinstance(ev, Snapshot):
                print(f"#{ev.sequence} snapshot: {len(ev.models)} variants, {len(ev.aliases)} aliases")
            elif isinstance(ev, ModelPublished):
                print(f"#{ev.sequence} published {ev.model.label()} {ev.model.path}")
            elif isinstance(ev, ModelRemoved):
                print(f"#{ev.sequence} {ev.reason} {ev.model.label()}")
            elif isinstance(ev, AliasSet):
                back = f" (went back: {ev.reason})" if ev.reverted else ""
                print(f"#{ev.sequence} alias {ev.alias.name} -> {_alias_target(ev.alias)} {ev.alias.path}{back}")
            elif isinstance(ev, ModelCorrupted):
                print(f"#{ev.sequence} corrupt {ev.model.label()}: {'; '.join(ev.problems)}")
            elif isinstance(ev, AliasRemoved):
                print(f"#{ev.sequence} alias {ev.alias.name} removed")
            sys.stdout.flush()
    return 0


def _run_adapter_operation(stream: AdapterStream, ns: argparse.Namespace, verb: str) -> int:
    bar = TransferBar(sys.stderr, not ns.quiet)
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        with stream:
            result: AdapterResult = stream.adapter_result(bar.update)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.done()
    if ns.json:
        print(_as_json(result))
        return 0
    a = result.adapter
    notes = [a.kind, a.layout, a.family, human_bytes(a.size_bytes)]
    if result.already_present:
        notes.append("already in the store")
    if result.replaced:
        notes.append("replaced the adapter stored under that name")
    if result.downloaded_bytes:
        notes.append(f"{human_bytes(result.downloaded_bytes)} downloaded")
    print(f"{verb} adapter {a.name} ({'; '.join(notes)})")
    print(f"  {a.path}")
    return 0


def cmd_adapters_pull(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        stream = c.stream_pull_adapter(
            ns.repo_id, revision=ns.revision, filename=ns.filename, name=ns.name, token=ns.token, replace=ns.replace
        )
        return _run_adapter_operation(stream, ns, "pulled")


def cmd_adapters_import(ns: argparse.Namespace) -> int:
    path = os.path.abspath(ns.path)
    with _client(ns) as c:
        stream = c.stream_import_adapter(path, name=ns.name, token=ns.token, replace=ns.replace)
        return _run_adapter_operation(stream, ns, "imported")


def cmd_adapters_list(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        listing = c.list_adapters()
    if ns.json:
        print(_as_json(listing))
        return 0
    print(f"{'NAME':<28} {'KIND':<17} {'LAYOUT':<9} {'FAMILY':<6} {'SIZE':>10}  {'TOKEN':<16} BASE")
    for a in listing.adapters:
        state = f"  CORRUPT: {a.error}" if a.error else ""
        print(
            f"{a.name:<28} {a.kind:<17} {a.layout:<9} {a.family:<6} {human_bytes(a.size_bytes):>10}  "
            f"{a.token or '-':<16} {a.base or '-'}{state}"
        )
    print(f"adapters folder {listing.adapters_dir}: {len(listing.adapters)} adapter(s)")
    return 0


def _print_adapter(a: StoredAdapter) -> None:
    print(f"{a.name}  {a.kind}{'  CORRUPT: ' + a.error if a.error else ''}")
    print(f"  path         {a.path}")
    print(f"  layout       {a.layout}")
    print(f"  family       {a.family}")
    print(f"  base         {a.base or '-'}")
    print(f"  targets      {', '.join(a.targets)}")
    if a.token:
        print(f"  token        {a.token}")
    print(f"  size         {human_bytes(a.size_bytes)} ({a.size_bytes} bytes)")
    print(f"  sha256       {a.sha256}")
    print(f"  source       {a.source}")
    print(f"  created      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a.created_at))}")


def cmd_adapters_show(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        adapter = c.get_adapter(ns.name, verify=ns.verify)
    if ns.json:
        print(_as_json(adapter))
        return 0
    _print_adapter(adapter)
    if ns.verify:
        print("  verified     the file matches its recorded size and sha256")
    return 0


def cmd_adapters_rm(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        removed = c.delete_adapter(ns.name)
    if ns.json:
        print(_as_json({"removed": dataclasses.asdict(removed)}))
        return 0
    print(f"removed adapter {removed.name} (freed {human_bytes(removed.size_bytes)})")
    return 0


def add_adapter_commands(subparsers: Any) -> None:
    """Registers `adapters list|show|import|pull|rm` under `sdserve models`."""
    group = subparsers.add_parser("adapters", help="Stored LoRAs and textual-inversion embeddings.")
    sub = group.add_subparsers(dest="adapters_command", required=True)
    p = sub.add_parser("list", help="Stored adapters: kind, layout, family, size, token and base.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_adapters_list)
    p = sub.add_parser("show", help="One adapter's kind, base, targets, sha256 and source.")
    p.add_argument("name", help="Adapter name.")
    p.add_argument("--verify", action="store_true", help="Re-hash the file against its recorded sha256.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_adapters_show)
    for verb, help_text, func in (
        ("import", "Store a local .safetensors LoRA or embedding (inside the sidecar's import folders).",
         cmd_adapters_import),
        ("pull", "Download a LoRA or embedding .safetensors file from the Hugging Face Hub.", cmd_adapters_pull),
    ):  # fmt: skip
        p = sub.add_parser(verb, help=help_text)
        if verb == "import":
            p.add_argument("path", help=".safetensors file, on the sidecar's machine.")
            p.add_argument("--name", default="", help="Adapter name (default: the file name without .safetensors).")
        else:
            p.add_argument("repo_id", help="Hub repository, owner/name.")
            p.add_argument("--revision", default="", help="Branch, tag or commit (default main).")
            p.add_argument("--filename", default="", help="The file in the repository (needed when it has several).")
            p.add_argument("--name", default="", help="Adapter name (default: the repository's name).")
        p.add_argument("--token", default="", help="Textual inversion: the token that invokes it in prompts.")
        p.add_argument("--replace", action="store_true", help="Replace an adapter stored under the name.")
        p.add_argument("--quiet", action="store_true", help="No progress output.")
        p.add_argument("--json", action="store_true", help="Print the result as JSON.")
        _common(p, func)
    p = sub.add_parser("rm", help="Remove a stored adapter.")
    p.add_argument("name", help="Adapter name.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_adapters_rm)


def _common(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    p.add_argument(
        "--manager",
        default=os.environ.get("SDSERVE_MANAGER", DEFAULT_TARGET),
        help=f"Model manager address, host:port or unix:/path (env SDSERVE_MANAGER; default {DEFAULT_TARGET}).",
    )
    # Own dests: `sdserve --api-key` is the server's key and must not reach the sidecar.
    p.add_argument(
        "--api-key",
        dest="manager_api_key",
        default=os.environ.get("SDSERVE_MANAGER_API_KEY", ""),
        help="The model manager's API key (bearer token; env SDSERVE_MANAGER_API_KEY).",
    )
    p.add_argument(
        "--tls",
        dest="manager_tls",
        action="store_true",
        help="Connect with TLS (implied by --tls-ca-file and --tls-cert-file).",
    )
    p.add_argument(
        "--tls-ca-file", dest="manager_tls_ca_file", default="", help="PEM roots to trust; empty: the system roots."
    )
    p.add_argument(
        "--tls-cert-file", dest="manager_tls_cert_file", default="", help="PEM client certificate chain (mutual TLS)."
    )
    p.add_argument("--tls-key-file", dest="manager_tls_key_file", default="", help="PEM key of --tls-cert-file.")
    p.set_defaults(func=func)


def add_models_commands(subparsers: Any) -> None:
    """Registers pull, import, quantize, alias set/rm, list, show, rm, pin, unpin, watch and adapters under
    `sdserve models`."""
    p = subparsers.add_parser("pull", help="Download a model from the Hugging Face Hub into the store.")
    p.add_argument("repo_id", help="Hub repository, for example stable-diffusion-v1-5/stable-diffusion-inpainting.")
    p.add_argument("--revision", default="", help="Branch, tag or commit (default main).")
    p.add_argument("--variant", choices=VARIANTS, default="", help="Variant to store (default fp32).")
    p.add_argument("--name", default="", help="Store name (default: the repository's name).")
    p.add_argument("--quiet", action="store_true", help="No progress output.")
    p.add_argument("--json", action="store_true", help="Print the result as JSON.")
    _common(p, cmd_pull)

    p = subparsers.add_parser("import", help="Import a diffusers folder or a single-file .safetensors checkpoint.")
    p.add_argument("path", help="Folder or .safetensors file, on the sidecar's machine, inside its import folders.")
    p.add_argument("--name", default="", help="Store name (default: the folder or file name).")
    p.add_argument(
        "--architecture",
        default="",
        choices=("", "sd1", "sd1-inpainting", "sd2-base", "sd2-v", "sd2-inpainting"),
        help="Architecture of a single-file checkpoint (default: detect).",
    )
    p.add_argument("--config-from", default="", help="Stored model or folder whose configs and tokenizer to use.")
    p.add_argument("--quiet", action="store_true", help="No progress output.")
    p.add_argument("--json", action="store_true", help="Print the result as JSON.")
    _common(p, cmd_import)

    p = subparsers.add_parser("quantize", help="Make an fp16, bf16 or int8 variant of a stored model.")
    p.add_argument("name", help="Model name.")
    p.add_argument("--to", required=True, choices=("int8", "fp16", "bf16"), help="Variant to make.")
    p.add_argument("--revision", default="", help="Revision (default: the newest).")
    p.add_argument("--no-quality", action="store_true", help="Skip the PSNR measurement against fp32.")
    p.add_argument("--quiet", action="store_true", help="No progress output.")
    p.add_argument("--json", action="store_true", help="Print the result as JSON.")
    _common(p, cmd_quantize)

    alias = subparsers.add_parser("alias", help="Aliases (setting one is a hot swap).")
    asub = alias.add_subparsers(dest="alias_command", required=True)
    p = asub.add_parser(
        "set", help="Point an alias at NAME[@REVISION][:VARIANT], or split it between weighted targets (a canary)."
    )
    p.add_argument("alias", help="Alias, for example default.")
    p.add_argument(
        "target",
        nargs="+",
        help="NAME[@REVISION][:VARIANT]; default: newest revision, preferred variant. Two or more targets make a "
        "canary alias, each with its weight: sd15-v1*90 sd15-v2*10.",
    )
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_alias_set)
    p = asub.add_parser("rm", help="Remove an alias.")
    p.add_argument("alias", help="Alias.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_alias_rm)

    p = subparsers.add_parser("list", help="Stored models, aliases and disk usage (from the model manager).")
    p.add_argument("name", nargs="?", default="", help="Only this model.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_list)

    p = subparsers.add_parser("show", help="A stored model's variants, source, size, quality and files.")
    p.add_argument("name", help="Model name.")
    p.add_argument("--files", action="store_true", help="List every file with its sha256.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_show)

    p = subparsers.add_parser("rm", help="Remove NAME, NAME@REVISION or NAME@REVISION:VARIANT from the store.")
    p.add_argument("target", help="NAME[@REVISION][:VARIANT].")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    _common(p, cmd_rm)

    p = subparsers.add_parser("pin", help="Protect a model from eviction.")
    p.add_argument("name", help="Model name.")
    p.set_defaults(pinned=True)
    _common(p, cmd_pin)
    p = subparsers.add_parser("unpin", help="Let a model be evicted again.")
    p.add_argument("name", help="Model name.")
    p.set_defaults(pinned=False)
    _common(p, cmd_pin)

    p = subparsers.add_parser("watch", help="Print store changes as they happen (Ctrl-C stops).")
    p.add_argument("--json", action="store_true", help="Print one JSON object per event and line.")
    _common(p, cmd_watch)

    add_adapter_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdserve models", description="Manage the model store through the sidecar.")
    add_models_commands(parser.add_subparsers(dest="models_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m sdserve.models_cli ...`, the same commands as `sdserve models ...`."""
    ns = build_parser().parse_args(argv)
    try:
        code: int = ns.func(ns)
        return code
    except SdserveError as err:
        sys.stderr.write(f"sdserve: error: {err.one_line()}\n")
        return 2 if err.code == "INVALID_ARGUMENT" else 1


if __name__ == "__main__":
    sys.exit(main())
