"""sdserve model-manager sidecar (see issue: fetch, verify, cache, quantize, hot-swap)."""
