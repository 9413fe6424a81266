"""Documentation that is generated from code stays current."""

from __future__ import annotations

import importlib.util

from service.settings import REPO_ROOT


def test_configuration_doc_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO_ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert current == module.render(), "docs/configuration.md is stale: run `make gen`"
