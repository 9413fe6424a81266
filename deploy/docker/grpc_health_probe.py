"""Exec probe for grpc.health.v1: exits 0 when the named service is SERVING, 1 otherwise.

Kubernetes' native `grpc:` probe speaks plaintext to the pod IP only. This script covers the two cases it
cannot: a TLS-only server port (the `tls` overlay) and the model-manager sidecar, which listens on loopback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port to check")
    p.add_argument("--service", default="", help='health service name ("" = readiness)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by --tls-ca-file)")
    p.add_argument("--tls-ca-file", default="", help="PEM roots to trust; empty: the system roots")
    p.add_argument("--tls-cert-file", default="", help="client certificate for mTLS")
    p.add_argument("--tls-key-file", default="", help="client key for mTLS")
    p.add_argument("--tls-server-name", default="", help="name to verify in the server certificate")
    return p


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _channel(ns: argparse.Namespace) -> grpc.Channel:
    if not (ns.tls or ns.tls_ca_file):
        return grpc.insecure_channel(ns.addr)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ns.tls_ca_file),
        private_key=_read(ns.tls_key_file),
        certificate_chain=_read(ns.tls_cert_file),
    )
    options = [("grpc.ssl_target_name_override", ns.tls_server_name)] if ns.tls_server_name else []
    return grpc.secure_channel(ns.addr, creds, options=options)


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    with _channel(ns) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=ns.service), timeout=ns.timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            print(f"health {ns.service!r} at {ns.addr}: {code.name if code else err}", file=sys.stderr)
            return 1
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"health {ns.service!r} at {ns.addr}: {state}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
