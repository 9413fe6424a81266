"""Entry point of `python -m training.shapes`."""

import os
import sys

# libgomp reads this once, when torch loads. Spinning OpenMP workers on a shared 2-core machine
# made training steps 5-10x slower whenever other processes were busy; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main

sys.exit(main(sys.argv[1:]))
