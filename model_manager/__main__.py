"""Entry point: python -m model_manager [flags]."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings


def main() -> None:
    from model_manager.settings import Settings
    from service import logs

    settings = Settings.from_sources(sys.argv[1:])
    logs.configure(settings.log_format, settings.log_level)
    # Library progress bars and notices are noise in a service log; progress goes to callers instead.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if settings.torch_threads:
        # torch is imported only when a conversion needs it; it reads its intra-op thread count from here then.
        os.environ["OMP_NUM_THREADS"] = str(settings.torch_threads)
    logging.getLogger(__name__).info("starting", extra=settings.redacted())
    from model_manager.server import serve

    try:
        asyncio.run(serve(settings))
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # Start-up refusals (a busy port, another sidecar holding the store) already say what: one line.
        sys.stderr.write(f"python -m model_manager: error: {exc.code}\n")
        sys.stderr.flush()
        os._exit(1)
    except OSError as exc:
        # An unreadable store or file is the operator's to fix: one line, not a traceback (--log-level DEBUG has it).
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        what = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        sys.stderr.write(f"python -m model_manager: error: {what}\n")
        sys.stderr.flush()
        # Skip finalizers: a half-started gRPC server's would complain that its event loop is closed.
        os._exit(1)


if __name__ == "__main__":
    main()
