"""Shared lower layer of the server and the sidecar: settings, logging, auth, edge, start-up, model-folder contract."""
