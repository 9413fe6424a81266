"""The store's folder layout; every path it hands out is checked to lie inside the store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from model_manager.names import is_safe_component


class StoreLayout:
    """Paths of one store: models/<name>/<revision>/<variant>/, adapters/<name>/, staging/, downloads/,
    aliases.json, state.json. The sidecar's own state (aliases.json, state.json and the lock) lives in `state_dir`
    when one is given: a read-only store (a shared volume) keeps it in a writable folder of its own."""

    def __init__(self, root: Path, state_dir: Path | None = None):
        self.root = root.expanduser().resolve()
        self.state_dir = state_dir.expanduser().resolve() if state_dir is not None else self.root
        self.models = self.root / "models"
        self.adapters = self.root / "adapters"
        self.staging = self.root / "staging"
        self.downloads = self.root / "downloads"
        self.aliases = self.state_dir / "aliases.json"
        self.state = self.state_dir / "state.json"
        self.lock = self.state_dir / ".lock"

    def create(self, read_only: bool = False) -> None:
        """Makes the store's folders; a read-only store only its state folder (the store must exist)."""
        if read_only:
            # A shared store may be empty or not populated yet: rescans take in what appears later.
            self.state_dir.mkdir(parents=True, exist_ok=True)
            return
        for folder in (self.root, self.models, self.adapters, self.staging, self.downloads, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def variant_dir(self, name: str, revision: str, variant: str) -> Path:
        """<store>/models/<name>/<revision>/<variant>; raises ValueError for any unsafe component."""
        for part in (name, revision, variant):
            if not is_safe_component(part):
                raise ValueError(f"unsafe path component {part!r}")
        path = self.models / name / revision / variant
        if os.path.commonpath([path, self.models]) != str(self.models):
            raise ValueError(f"{path} is outside the store")
        return path

    def adapter_dir(self, name: str) -> Path:
        """<store>/adapters/<name>; raises ValueError for an unsafe name."""
        if not is_safe_component(name):
            raise ValueError(f"unsafe path component {name!r}")
        path = self.adapters / name
        if os.path.commonpath([path, self.adapters]) != str(self.adapters):
            raise ValueError(f"{path} is outside the store")
        return path

    def new_staging(self, label: str) -> Path:
        """A fresh, empty staging folder on the store's file system (so publishing is a rename)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60]
        return Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=self.staging))

    def trash_path(self) -> Path:
        """A unique name in staging/ to rename a folder to before deleting it (so deletion looks atomic)."""
        return Path(tempfile.mktemp(prefix=".trash-", dir=self.staging))
