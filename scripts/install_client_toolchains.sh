#!/usr/bin/env bash
# Installs what the TypeScript and Go clients need to generate, build and test, on Debian 12:
#   - Go 1.19, protoc, protoc-gen-go, protoc-gen-go-grpc and the grpc-go / protobuf-go / genproto
#     sources from Debian (the Go client builds offline against /usr/share/gocode);
#   - the npm packages pinned in clients/typescript/package-lock.json (npm ci), on Node >= 20;
#   - Chromium (with DejaVu fonts for the README screenshots), the browser tests/test_playground.py drives
#     through Playwright for Python (the `dev` extra) at /usr/bin/chromium: no `playwright install`.
# Idempotent: installs only missing Debian packages and reruns npm ci only when the lock file changed.
# Uses sudo for apt-get when not root. Needs apt and the npm registry reachable.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

# Name golang-github-golang-protobuf-1-5-dev explicitly: otherwise apt may satisfy grpc's dependency
# with the 1-3 package, and the client panics on its first reply.
packages=(
  golang-go
  protobuf-compiler
  protoc-gen-go
  protoc-gen-go-grpc
  golang-google-grpc-dev
  golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev
  golang-google-genproto-dev
  chromium
  fonts-dejavu-core
)
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

apt_install() {
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install_client_toolchains: apt-get install ${missing[*]}"
  apt_install "${missing[@]}"
else
  echo "install_client_toolchains: Debian packages present"
fi

node_major() { node -e 'process.stdout.write(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }
if ! command -v npm >/dev/null || [ "$(node_major)" -lt 20 ]; then
  # Debian 12's own nodejs is 18; this helps only where apt has a Node 20+ source (e.g. NodeSource).
  echo "install_client_toolchains: Node >= 20 with npm not found; trying apt-get install nodejs npm"
  apt_install nodejs npm || true
fi
if ! command -v npm >/dev/null || [ "$(node_major)" -lt 20 ]; then
  echo "install_client_toolchains: need Node >= 20 with npm (found: $(node --version 2>/dev/null || echo none));" \
    "connect-node 2.1 and protoc-gen-es 2.13 require it" >&2
  exit 1
fi

ts="$root/clients/typescript"
stamp="$ts/node_modules/.sdserve-lock.sha256"
want="$(sha256sum "$ts/package-lock.json" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$ts/node_modules/.bin/tsc" ]; then
  echo "install_client_toolchains: clients/typescript/node_modules is current"
else
  echo "install_client_toolchains: npm ci in clients/typescript"
  (cd "$ts" && npm ci --no-audit --no-fund)
  echo "$want" >"$stamp"
fi

# Offline Go builds: vendor/ as symlinks into /usr/share/gocode (not committed).
"$root/clients/go/vendor-debian.sh"
echo "install_client_toolchains: done ($(go version | cut -d' ' -f3), node $(node --version), $(protoc --version))"
