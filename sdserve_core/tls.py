"""TLS server credentials from PEM files, for the server and the sidecar alike."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials | None:
    """Credentials from a certificate chain and its key (None: plaintext); mutual TLS when a client CA is given.
    An unreadable file stops start-up with one line naming it."""
    if not cert_file:
        return None
    try:
        key = Path(key_file).read_bytes()
        cert = Path(cert_file).read_bytes()
        ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    except OSError as exc:
        raise SystemExit(f"cannot read a TLS file: {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
