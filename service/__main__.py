"""Entry point: python -m service [flags]."""

from __future__ import annotations

import os
import sys
import warnings


def main() -> None:
    from sdserve_core import logs
    from service.settings import Settings

    settings = Settings.from_sources(sys.argv[1:])
    logs.configure(settings.log_format, settings.log_level)
    # Library progress bars and the torchvision notice are noise in a server's log.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from sdserve_core.startup import run_main
    from service.server import serve

    run_main("python -m service", serve(settings))


if __name__ == "__main__":
    main()
