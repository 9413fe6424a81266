"""Waits until the model-manager sidecar beside it has reconciled its declared state, read from its /metrics.

The main container of the shared-store populate Job (deploy/k8s/components/shared-store): the Job's pod runs the
sidecar in its normal, writable mode against the shared volume with the declared state, and this script ends the
Job once the sidecar has converged. The sidecar has no "exit when converged" flag; its metrics say when:
`sdserve_manager_reconcile_last_success_timestamp_seconds` is 0 in a new process until a pass ends with every
declared entry (model, variants, verification, pins, aliases, adapters) converged.

Exit status: 0 converged; 1 --timeout-seconds passed first; 2 the declared-state file was rejected (it does not
parse or cannot be read) and nothing was applied; 3 --max-failed-passes passes ended with failed entries (the
sidecar retries failed entries every --declared-retry-seconds; the log names each failed entry and why).
Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

CONVERGED, TIMED_OUT, FILE_REJECTED, ENTRIES_FAILED = 0, 1, 2, 3

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Reconcile:
    """What the sidecar's metrics say about its declared state."""

    last_success: float
    pending_models: float
    failed_entries: float
    failed_passes: float
    file_errors: float
    applied: str  # the sha256 prefix of the applied content; "" before the first pass

    def line(self) -> str:
        applied = self.applied or "none yet"
        return (
            f"applied {applied}: {self.pending_models:g} models pending, {self.failed_entries:g} failed entries, "
            f"{self.failed_passes:g} failed passes"
        )


def parse(text: str) -> Reconcile:
    """The reconcile gauges and counters from a Prometheus text exposition."""
    values: dict[str, float] = {}
    applied = ""
    for raw in text.splitlines():
        match = _SAMPLE.match(raw)
        if not match:
            continue
        name, labels_text, value = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        number = float(value)
        if name == "sdserve_manager_declared_state_applied" and number == 1:
            applied = labels.get("sha256", "")
        elif name == "sdserve_manager_reconcile_passes_total" and labels.get("result") == "failed":
            values["failed_passes"] = number
        elif name == "sdserve_manager_reconcile_errors_total" and labels.get("kind") == "file":
            values["file_errors"] = values.get("file_errors", 0.0) + number
        elif name.startswith("sdserve_manager_reconcile_") and not labels_text:
            values[name.removeprefix("sdserve_manager_reconcile_")] = number
    return Reconcile(
        last_success=values.get("last_success_timestamp_seconds", 0.0),
        pending_models=values.get("pending_models", 0.0),
        failed_entries=values.get("failed_entries", 0.0),
        failed_passes=values.get("failed_passes", 0.0),
        file_errors=values.get("file_errors", 0.0),
        applied=applied,
    )


def verdict(state: Reconcile, max_failed_passes: int) -> int | None:
    """The exit status this state calls for, or None to keep waiting."""
    if state.last_success > 0:
        return CONVERGED
    if state.file_errors > 0 and not state.applied:
        return FILE_REJECTED
    if max_failed_passes > 0 and state.failed_passes >= max_failed_passes:
        return ENTRIES_FAILED
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--metrics-url", default="http://127.0.0.1:9401/metrics", help="the sidecar's /metrics")
    p.add_argument("--interval-seconds", type=float, default=10.0, help="seconds between reads")
    p.add_argument("--timeout-seconds", type=float, default=0.0, help="give up after this long; 0: never")
    p.add_argument("--max-failed-passes", type=int, default=5, help="give up after this many failed passes; 0: never")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    deadline = time.monotonic() + ns.timeout_seconds if ns.timeout_seconds > 0 else None
    said = ""
    while True:
        try:
            with urllib.request.urlopen(ns.metrics_url, timeout=5) as response:
                state: Reconcile | None = parse(response.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            state, line = None, f"waiting for the sidecar's metrics at {ns.metrics_url}: {exc}"
        if state is not None:
            line = state.line()
            status = verdict(state, ns.max_failed_passes)
            if status is not None:
                messages = {
                    CONVERGED: "declared state converged",
                    FILE_REJECTED: "the declared-state file was rejected (see the model-manager log)",
                    ENTRIES_FAILED: "declared entries keep failing (see the model-manager log)",
                }
                print(f"{messages[status]}; {line}", flush=True)
                return status
        if line != said:
            print(line, flush=True)
            said = line
        if deadline is not None and time.monotonic() >= deadline:
            print(f"timed out after {ns.timeout_seconds:g} s; {line}", flush=True)
            return TIMED_OUT
        time.sleep(ns.interval_seconds)


if __name__ == "__main__":
    sys.exit(main())
