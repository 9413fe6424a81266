#!/usr/bin/env bash
# The one-shot GPU benchmark (bench/gpu.py): direct diffusers against sdserve's execution profiles on full-size SD 1.5-
# and SDXL-shaped random-weight models, under 8 minutes on one H100. Writes bench/results/gpu.json; arguments go to
# `python -m bench.gpu` (a later --out wins; relative paths are from the repository root), e.g.
#   bench/gpu.sh                                  # on a CUDA machine
#   bench/gpu.sh --dry-run --out /tmp/gpu.json    # CPU, tiny models, seconds (tests/test_bench_gpu.py runs this)
# The repository's .venv python is used when present, else python3; PYTHON=... overrides both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  fi
fi
exec "$PYTHON" -m bench.gpu --out bench/results/gpu.json "$@"
