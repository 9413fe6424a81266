#!/usr/bin/env bash
# Fails when the committed generated code differs from what the protos generate now.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$root/scripts/gen.sh" "$tmp" >/dev/null 2>&1 || { echo "scripts/gen.sh failed" >&2; "$root/scripts/gen.sh" "$tmp"; exit 1; }
stale=0
while IFS= read -r -d '' f; do
  rel="${f#"$tmp"/}"
  if ! cmp -s "$f" "$root/$rel"; then
    echo "stale or missing generated file: $rel" >&2
    stale=1
  fi
done < <(find "$tmp" -type f -print0)
if [ $stale -ne 0 ]; then
  echo "generated code differs from the protos: run 'make gen' and commit" >&2
  exit 1
fi
echo "generated code matches the protos ($(find "$tmp" -type f | wc -l) files)"
