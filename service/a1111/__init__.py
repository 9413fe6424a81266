"""The AUTOMATIC1111-compatible REST subset (/sdapi/v1): a thin edge that builds the contract's requests and runs
them through the servicer's own request path (validation, queue, streaming, errors, accounting).

See docs/a1111.md for what is honoured, ignored and refused."""
