"""Entry point: python -m service [flags]."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import warnings


def main() -> None:
    from service import logs
    from service.settings import Settings

    settings = Settings.from_sources(sys.argv[1:])
    logs.configure(settings.log_format, settings.log_level)
    # Library progress bars and the torchvision notice are noise in a server's log.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from service.server import serve

    try:
        asyncio.run(serve(settings))
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # Start-up refusals (a busy port) already say what and which flag: one line with the program's name.
        sys.stderr.write(f"python -m service: error: {exc.code}\n")
        sys.stderr.flush()
        os._exit(1)
    except OSError as exc:
        # A busy port or an unreadable file is the operator's to fix: one line, not a traceback (--log-level DEBUG
        # still shows it). /metrics is the one listener bound as a plain socket, so a busy address is its port.
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        what = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE and settings.metrics_port > 0:
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            what = f"--metrics-port {settings.metrics_port}: {where} is in use"
        elif exc.filename:
            what = f"{exc.filename}: {what}"
        sys.stderr.write(f"python -m service: error: {what}\n")
        sys.stderr.flush()
        # Skip finalizers: the half-started gRPC server's would complain that its event loop is closed.
        os._exit(1)


if __name__ == "__main__":
    main()
