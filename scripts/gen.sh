#!/usr/bin/env bash
# Regenerates every language's code from proto/. Usage: scripts/gen.sh [OUT_ROOT]
# OUT_ROOT defaults to the repository root; CI passes a temp dir and diffs (scripts/check_gen.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
protos=$(find proto -name '*.proto' | sort)
mkdir -p "$out/clients/python"
rm -rf "$out/clients/python/sdserve/v1"
"$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out/clients/python" --grpc_python_out="$out/clients/python" $protos
"$py" -m grpc_tools.protoc -Iproto \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  --mypy_out="$out/clients/python" --mypy_grpc_out="$out/clients/python" $protos
# Connect / gRPC-Web / JSON server stubs (connect-python): the server's HTTP edge imports them; the gRPC client
# does not, so `pip install sdserve` still needs only grpcio and protobuf.
"$py" -m grpc_tools.protoc -Iproto \
  --plugin=protoc-gen-connect-python="$(dirname "$py")/protoc-gen-connect-python" \
  --connect-python_out="$out/clients/python" $protos
touch "$out/clients/python/sdserve/v1/__init__.py"
printf '"""Generated protobuf and gRPC modules for sdserve.v1 (do not edit; run make gen)."""\n' \
  > "$out/clients/python/sdserve/v1/__init__.py"
if [ -x "$root/scripts/gen_extra.sh" ]; then "$root/scripts/gen_extra.sh" "$out"; fi
