"""A loopback fleet for tests: replicas (a server and its sidecar, each with its own store) reconciling one declared
state from a local Hub, and the Prometheus counters and logs of each."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.model_manager.harness import Sidecar
from tests.model_manager.hubserver import HubServer
from tests.procs import ServiceProcess


class Replica:
    """One pod's worth: a sidecar reconciling the declared state into its own store, and a server following it."""

    def __init__(self, name: str, root: Path, hub: HubServer, declared: Path):
        self.name = name
        self.root = root
        self.sidecar = Sidecar(
            root / "store",
            hub_url=hub.url,
            args=["--declared-state", str(declared), "--declared-poll-seconds", "0.2", "--quality-check", "false"],
        )
        self.server: ServiceProcess | None = None
        self.metrics_port = 0

    def start_server(self) -> None:
        """Starts the server (on a fresh port); `wait_ready` waits for it to serve the declared default."""
        workdir = self.root / f"server-{len(list(self.root.glob('server-*')))}"
        workdir.mkdir()
        (workdir / "models").mkdir()
        self.server = ServiceProcess(
            workdir / "models",
            workdir,
            "--default-model", "",  # the sidecar's `default` alias, as the declared state sets it
            "--manager-target", self.sidecar.target,
            "--wait-for-default-seconds", "120",
            "--replica", self.name,
            "--calibrate-batching", "false",
            "--execution-profile", "exact",
            # One request per pipeline call and one torch thread everywhere: the same seed makes the same bytes on
            # every replica (batch size and thread count change the last bits of some kernels).
            "--max-batch-images", "1",
            "--torch-threads", "1",
            "--metrics-port", "0",
        )  # fmt: skip

    def wait_ready(self) -> None:
        assert self.server is not None
        self.server.wait_ready(timeout=180)
        listening = [r for r in _records(self.server.log_lines()) if r.get("msg") == "listening"]
        self.metrics_port = int(str(listening[0]["metrics_port"]))

    @property
    def target(self) -> str:
        assert self.server is not None and self.server.target
        return self.server.target

    @property
    def alive(self) -> bool:
        return self.server is not None and self.server.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP to the server: it holds its connections (still READY to clients) and does nothing more."""
        assert self.server is not None
        self.server.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL to the server: nothing in it runs again (no drain, no trailers)."""
        assert self.server is not None
        self.server.proc.kill()

    def counters(self, name: str = "sdserve_requests_total") -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of one counter on the server's /metrics, by their sorted labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {
            tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name
        }

    def finished(self, outcome: str = "ok") -> float:
        """Generation RPCs this server finished with `outcome`, over every model and transport."""
        return sum(v for labels, v in self.counters().items() if dict(labels)["outcome"] == outcome)

    def logs(self, lines: int = 40) -> str:
        server = self.server.log_lines()[-lines:] if self.server is not None else []
        return (
            f"--- {self.name} server\n"
            + "\n".join(server)
            + f"\n--- {self.name} sidecar\n"
            + "".join(self.sidecar.lines[-lines:])
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.sidecar.stop()


def _records(lines: list[str]) -> Iterator[dict[str, object]]:
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                yield record


def write_declared(path: Path, models: dict[str, str], aliases: dict[str, str]) -> None:
    """Writes the declared state (model name -> hub repo at `main`) atomically, as kubelet swaps a ConfigMap in: no
    sidecar ever reads half a file."""
    state = {
        "version": 1,
        "models": [{"name": n, "source": {"hub": {"repo": r, "revision": "main"}}} for n, r in models.items()],
        "aliases": aliases,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


class Fleet:
    """Replicas that share one declared-state file; started together, each on its own ports and store."""

    def __init__(self, root: Path, hub: HubServer, declared: Path, size: int):
        self.declared = declared
        self.replicas = [Replica(f"replica-{i}", root / f"replica-{i}", hub, declared) for i in range(size)]

    def start(self) -> Fleet:
        _each(lambda r: r.sidecar.start(), self.replicas)
        for r in self.replicas:
            r.start_server()
        _each(Replica.wait_ready, self.replicas)
        return self

    def heal(self) -> None:
        """Restarts any server that is not running (a test killed it), so every test starts with the whole fleet."""
        dead = [r for r in self.replicas if not r.alive]
        for r in dead:
            r.start_server()
        _each(Replica.wait_ready, dead)

    @property
    def target(self) -> str:
        """The fleet as one gRPC target, for sdserve.fleet's balanced channel."""
        return "ipv4:" + ",".join(r.target for r in self.replicas)

    def logs(self) -> str:
        return "\n".join(r.logs() for r in self.replicas)

    def stop(self) -> None:
        for r in self.replicas:
            r.stop()


def _each(step: Callable[[Replica], object], replicas: list[Replica]) -> None:
    """Runs `step(replica)` for every replica at once (start-up is mostly waiting) and re-raises the first error."""
    errors: list[BaseException] = []

    def run(r: Replica) -> None:
        try:
            step(r)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
