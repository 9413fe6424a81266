"""`sdserve serve`: runs the model-manager sidecar and the server as child processes and supervises them."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

_PR_SET_PDEATHSIG = 1


def describe_exit(code: int) -> str:
    """'exited with code 1' or 'was killed by SIGKILL'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def shell_code(code: int) -> int:
    """A child's return code as a process exit status: death by signal N is 128 + N, as shells report it."""
    return 128 - code if code < 0 else code


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook that has the kernel send the child SIGTERM when this process dies, so a killed
    `sdserve serve` leaves no server or sidecar behind. (The children run in their own process group, so
    signals sent to ours reach them only through this process.)"""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


@dataclasses.dataclass
class Child:
    """One supervised process. `ready_file` (if any) is written by the child once it serves."""

    name: str
    argv: list[str]
    ready_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    sent: set[int] = dataclasses.field(default_factory=set)

    def start(self) -> None:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        self.sent = set()
        # The supervisor runs no threads, so a pre-exec hook is safe here.
        self.proc = subprocess.Popen(self.argv, process_group=0, preexec_fn=_die_with_parent())  # noqa: PLW1509

    @property
    def code(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def was_ready(self) -> bool:
        return self.ready_file is not None and self.ready_file.exists() and bool(self.ready_file.read_text())

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.sent.add(signum)
            # os.kill, not Popen.send_signal: that polls, and a poll would reap the child behind os.wait's back.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def stopped_as_asked(self) -> bool:
        """Exited cleanly, or was killed by a signal sent to it (before it could install its handlers)."""
        code = self.code
        return code == 0 or (code is not None and -code in self.sent)


def say(line: str) -> None:
    sys.stderr.write(f"sdserve: {line}\n")
    sys.stderr.flush()


class Supervisor:
    """Starts the sidecar (if any) and the server; forwards Ctrl-C and SIGTERM to the server only, so it drains
    first; stops the sidecar once the server has exited. A sidecar that dies after it served is restarted (said
    once per restart); one that dies before it ever served, or a server that dies, ends `sdserve serve`
    with a non-zero status and a line naming the child and how it ended."""

    def __init__(self, server: Child, manager: Child | None):
        self.server = server
        self.manager = manager
        self.stopping = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        # The server drains first; a second signal cuts its drain short. Once it is gone, signals stop the sidecar.
        target = self.server if self.server.proc is None or self.server.running() else self.manager
        if target is not None:
            target.signal(signum)

    def _reap(self) -> Child:
        """Blocks until a child exits (signal handlers run meanwhile) and records its return code."""
        while True:
            pid, status = os.wait()
            for child in (self.server, self.manager):
                if child is not None and child.proc is not None and child.proc.pid == pid:
                    child.proc.returncode = os.waitstatus_to_exitcode(status)
                    return child

    def run(self) -> int:
        """Runs both children until the server exits; returns the exit status for `sdserve serve`."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        manager, server = self.manager, self.server
        if manager is not None:
            manager.start()
        server.start()
        if self.stopping:  # a signal came before the server existed
            server.signal(signal.SIGTERM)
        failed = False
        while self._reap() is not server:
            assert manager is not None and manager.code is not None
            how = describe_exit(manager.code)
            if self.stopping or failed:
                say(f"the model manager {how} while the server was stopping")
                failed = True
            elif manager.was_ready():
                say(f"the model manager {how}; restarting it (the server keeps serving)")
                manager.start()
            else:
                say(f"the model manager {how} before it was ready; stopping the server")
                failed = True
                server.signal(signal.SIGTERM)
        server_code = server.code
        assert server_code is not None
        server_ok = server.stopped_as_asked()
        if not server_ok:
            say(f"the server {describe_exit(server_code)}" + ("; stopping the model manager" if manager else ""))
        if manager is not None and manager.running():
            manager.signal(signal.SIGTERM)
            while manager.running():
                self._reap()
            if not manager.stopped_as_asked():
                say(f"the model manager {describe_exit(manager.code or 0)} while stopping")
                failed = True
        if not server_ok:
            return shell_code(server_code) or 1
        return 1 if failed else 0
