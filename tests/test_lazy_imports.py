"""The server resolves every diffusers and transformers name it uses before its worker thread starts, so no two
threads ever take the packages' lazy-import path at once (a fresh server's first Generate failed INTERNAL with
"cannot import name 'CLIPTokenizer' from 'transformers'")."""

from __future__ import annotations

import subprocess
import sys

from service.settings import REPO_ROOT

CHECK = """
import diffusers, transformers
from sdserve_core import lazy_imports
from service import schedulers
before = [n for n in lazy_imports.TRANSFORMERS if n in vars(transformers)]
lazy_imports.resolve(cls for cls, _ in schedulers.SCHEDULERS.values())
names = [*lazy_imports.DIFFUSERS, *(cls for cls, _ in schedulers.SCHEDULERS.values())]
missing = [n for n in names if n not in vars(diffusers)]
missing += [n for n in lazy_imports.TRANSFORMERS if n not in vars(transformers)]
print("before", before)
print("missing", missing)
"""


def test_resolve_materialises_every_name_in_a_fresh_process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    # In a fresh process nothing was resolved before (so the check can fail), and nothing is left lazy after.
    assert "before []" in out
    assert "missing []" in out
