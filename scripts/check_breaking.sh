#!/usr/bin/env bash
# Fails when proto/ breaks compatibility (buf's FILE rules, see buf.yaml) with the main branch's protos.
# Skips (exit 0, saying why) where there is no main branch with a proto/ folder to compare against.
# On a clean clone of main the comparison is against itself, which passes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
buf="${BUF:-$root/.venv/bin/buf}"
[ -x "$buf" ] || buf="$root/clients/typescript/node_modules/.bin/buf"
if [ ! -x "$buf" ]; then
  echo "check_breaking.sh: buf not found (.venv/bin/buf from the dev extra, or npm ci in clients/typescript)" >&2
  exit 1
fi
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "check_breaking.sh: skipped: $root is not a git repository"
  exit 0
fi
if git rev-parse --verify --quiet refs/heads/main >/dev/null; then
  against='.git#branch=main,subdir=proto'
  base=main
elif git rev-parse --verify --quiet refs/remotes/origin/main >/dev/null; then
  # CI checkouts are often detached with only the remote-tracking branch present.
  against='.git#ref=refs/remotes/origin/main,subdir=proto'
  base=origin/main
else
  echo "check_breaking.sh: skipped: no main branch (local or origin/main) to compare against"
  exit 0
fi
if ! git cat-file -e "$base:proto" 2>/dev/null; then
  echo "check_breaking.sh: skipped: $base has no proto/ folder yet"
  exit 0
fi
"$buf" breaking proto --against "$against"
echo "check_breaking.sh: proto/ is compatible with $base"
