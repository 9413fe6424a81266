"""Entry point: python -m model_manager [flags]."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def main() -> None:
    from model_manager.settings import Settings
    from sdserve_core import logs

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
    from sdserve_core.startup import run_main

    run_main("python -m model_manager", serve(settings))


if __name__ == "__main__":
    main()
