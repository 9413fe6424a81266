"""sdserve model-manager sidecar: fetches, imports, verifies, converts and publishes models into the shared store."""
