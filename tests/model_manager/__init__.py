"""Tests of the model-manager sidecar: store, Hub pulls, imports, variants, crash safety, budget, events, CLI."""
