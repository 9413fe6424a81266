#!/usr/bin/env bash
# Builds clients/go/vendor/ as symlinks into Debian's Go sources (/usr/share/gocode/src), so that
# `go build` / `go test` work offline in module mode (-mod=vendor is Go's default when vendor/ exists).
# Idempotent; vendor/ is not committed (see .gitignore). Online, delete vendor/ and use the module proxy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="${GOCODE:-/usr/share/gocode/src}"
# module, version as Debian packages it, and whether go.mod requires it directly ("explicit").
modules=(
  "github.com/golang/protobuf v1.5.2 explicit"
  "google.golang.org/genproto v0.0.0-20200413115906-b5235f65be36 explicit"
  "google.golang.org/grpc v1.33.3 explicit"
  "google.golang.org/protobuf v1.28.1 explicit"
  "golang.org/x/net v0.7.0 indirect"
  "golang.org/x/sys v0.3.0 indirect"
  "golang.org/x/text v0.7.0 indirect"
)
tmp="$(mktemp -d "$here/.vendor.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
for entry in "${modules[@]}"; do
  read -r mod version kind <<<"$entry"
  if [ ! -d "$src/$mod" ]; then
    echo "vendor-debian.sh: $src/$mod is missing; run scripts/install_client_toolchains.sh" >&2
    exit 1
  fi
  gover="$(awk '$1 == "go" { print $2; exit }' "$src/$mod/go.mod" 2>/dev/null || true)"
  mkdir -p "$tmp/$(dirname "$mod")"
  ln -s "$src/$mod" "$tmp/$mod"
  {
    echo "# $mod $version"
    if [ "$kind" = explicit ]; then echo "## explicit${gover:+; go $gover}"; elif [ -n "$gover" ]; then echo "## go $gover"; fi
  } >>"$tmp/modules.txt"
done
rm -rf "$here/vendor"
chmod 755 "$tmp"
mv "$tmp" "$here/vendor"
trap - EXIT
