#!/usr/bin/env bash
# Installs the system tools the test suite uses, on Debian 12: promtool (package prometheus) for the
# live-scrape metrics check, openssl for the TLS tests' certificates, prlimit (util-linux) for the
# out-of-memory test, then the TypeScript and Go client toolchains. Idempotent; sudo only when not root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v openssl >/dev/null || need+=(openssl)
command -v prlimit >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "install_test_deps: apt-get install ${need[*]}"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
"$root/scripts/install_client_toolchains.sh"
