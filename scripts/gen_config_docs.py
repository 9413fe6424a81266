"""Writes docs/configuration.md from the Settings dataclass (run by `make gen`; a test checks it is current)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from service.settings import REPO_ROOT, Settings


def _show(value: object) -> str:
    if isinstance(value, tuple):
        value = ":".join(str(v) for v in value) if value and not isinstance(value[0], tuple) else value
    text = str(value).replace(str(REPO_ROOT), "<repo>").replace(str(Path.home()), "~")
    return f"`{text}`" if text not in ("", "()") else "(empty)"


def render() -> str:
    lines = [
        "# Server configuration",
        "",
        "Every setting is a flag of `python -m service` (and of `sdserve serve -- ...`) and an environment",
        "variable `SDSERVE_<NAME>`; flags win over the environment, which wins over the default. The settings",
        "object is built once at start-up and passed down; nothing else reads the environment.",
        "",
        "| flag | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"| `{flag}` | `SDSERVE_{f.name.upper()}` | {_show(f.default)} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Write docs/configuration.md (or the path given); `--check` fails when the committed file is stale."""
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    if any(a.startswith("-") for a in paths):
        print(f"unknown option {paths[0]!r}; usage: gen_config_docs.py [--check] [PATH]", file=sys.stderr)
        return 2
    target = Path(paths[0]) if paths else REPO_ROOT / "docs" / "configuration.md"
    if check:
        if not target.exists() or target.read_text() != render():
            print(f"{target} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
