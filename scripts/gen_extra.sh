#!/usr/bin/env bash
# Generates the TypeScript (Connect-ES) and Go client code from proto/. Called by scripts/gen.sh.
# Usage: scripts/gen_extra.sh OUT_ROOT   (the repository root, or a temp dir for the drift check)
# Needs the client toolchains: scripts/install_client_toolchains.sh installs them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"

ts="$root/clients/typescript"
go_module="$(awk '$1 == "module" { print $2 }' "$root/clients/go/go.mod")"

missing=()
[ -x "$ts/node_modules/.bin/buf" ] && [ -x "$ts/node_modules/.bin/protoc-gen-es" ] ||
  missing+=("clients/typescript/node_modules (npm ci)")
for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gen_extra.sh: missing ${missing[*]}; run scripts/install_client_toolchains.sh" >&2
  exit 1
fi

# TypeScript: buf + protoc-gen-es from clients/typescript/node_modules (versions pinned in package-lock.json).
rm -rf "$out/clients/typescript/src/gen"
mkdir -p "$out/clients/typescript"
(cd "$ts" && PATH="$ts/node_modules/.bin:$PATH" buf generate --template buf.gen.yaml -o "$out/clients/typescript")

# Go: Debian's protoc, protoc-gen-go and protoc-gen-go-grpc. The proto has no go_package
# (it is language-neutral), so the import path is mapped here.
protos=$(find proto -name '*.proto' | sort)
gen_go="$out/clients/go/gen"
rm -rf "$gen_go"
mkdir -p "$gen_go"
maps=()
for p in $protos; do
  dir="$(dirname "$p")"
  dir="${dir#proto/}"
  pkg="$(basename "$(dirname "$dir")")$(basename "$dir")" # sdserve/v1 -> sdservev1
  maps+=("M${p#proto/}=$go_module/gen/$dir;$pkg")
done
go_opts="paths=source_relative$(printf ',%s' "${maps[@]}")"
# shellcheck disable=SC2086 # $protos is a list of paths without spaces
protoc -Iproto --go_out="$gen_go" --go_opt="$go_opts" --go-grpc_out="$gen_go" --go-grpc_opt="$go_opts" $protos
