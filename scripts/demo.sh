#!/usr/bin/env bash
# make demo: starts sdserve on the embedded default model, runs generate, edit and inpaint through the CLI
# with streamed progress, writes the PNGs to demo-out/, and stops the service.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
PORT="${SDSERVE_DEMO_PORT:-50151}"
mkdir -p "$OUT"
rm -f "$OUT"/*.png "$OUT"/previews/* 2>/dev/null || true

echo "== starting sdserve on 127.0.0.1:$PORT (log: $OUT/server.log)"
# Its own sidecar port and no /metrics endpoints, so the demo runs beside another sdserve on the defaults.
HTTP_PORT="$((PORT + 2))"
"$BIN/sdserve" serve --port "$PORT" --manager-port "$((PORT + 1))" --http-port "$HTTP_PORT" \
  --metrics-port -1 --manager-metrics-port -1 > "$OUT/server.log" 2>&1 &
SERVER=$!
cleanup() { kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT

export SDSERVE_TARGET="127.0.0.1:$PORT"
for _ in $(seq 180); do
  "$BIN/sdserve" health >/dev/null && break
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "sdserve serve exited; last log lines:" >&2
    tail -20 "$OUT/server.log" >&2
    exit 1
  fi
  sleep 1
done
if ! "$BIN/sdserve" health >/dev/null; then
  echo "server did not become ready; last log lines:" >&2
  tail -20 "$OUT/server.log" >&2
  exit 1
fi
"$BIN/sdserve" models served

echo "== generate"
"$BIN/sdserve" generate --prompt "a large red circle in the centre on a blue background" \
  --seed 1 --out "$OUT/generate.png" --preview-dir "$OUT/previews"
echo "== edit (strength 0.7)"
"$BIN/sdserve" edit --image "$OUT/generate.png" --strength 0.7 \
  --prompt "a large yellow circle in the centre on a blue background" --seed 2 --out "$OUT/edit.png"
echo "== inpaint (mask: the left half)"
"$BIN/python" - "$OUT" <<'PY'
import sys
from PIL import Image, ImageDraw
out = sys.argv[1]
size = Image.open(f"{out}/generate.png").size
mask = Image.new("L", size, 0)
ImageDraw.Draw(mask).rectangle([0, 0, size[0] // 2 - 1, size[1] - 1], fill=255)
mask.save(f"{out}/mask.png")
PY
"$BIN/sdserve" inpaint --image "$OUT/generate.png" --mask "$OUT/mask.png" --preserve-unmasked \
  --prompt "a small green square on the left on a blue background" --seed 3 --out "$OUT/inpaint.png"
"$BIN/sdserve" info
echo "== the same server over HTTP (Connect JSON; the playground page is http://127.0.0.1:$HTTP_PORT/)"
curl -sf -H 'content-type: application/json' -d '{}' -o "$OUT/models.json" \
  "http://127.0.0.1:$HTTP_PORT/sdserve.v1.DiffusionService/ListModels"
head -c 400 "$OUT/models.json"; echo
echo "== stopping (the server drains first, then the sidecar)"
trap - EXIT
kill -TERM "$SERVER"
wait "$SERVER"
echo "== done: $(ls "$OUT"/*.png | tr '\n' ' ')"
