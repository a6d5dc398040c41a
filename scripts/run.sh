#!/usr/bin/env bash
# The main job: set up the host when needed, then start ComfyUI with the Hyper-SD pack
# on http://127.0.0.1:${HYPERSD_PORT:-8188} and keep serving until stopped (Ctrl-C).
source "$(dirname "$0")/_env.sh"
PORT="${HYPERSD_PORT:-8188}"
cd "$HYPERSD_COMFYUI"
"$HYPERSD_PYTHON" main.py --cpu --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --database-url "sqlite:///$HYPERSD_COMFYUI/user/comfy.db" "$@" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null' INT TERM EXIT
for _ in $(seq 1 240); do
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "ComfyUI exited during start; see its log above." >&2; exit 1; fi
  if "$HYPERSD_PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/object_info/HyperSDTCDSampler', timeout=2)" 2>/dev/null; then
    echo "ComfyUI with the Hyper-SD pack is serving at http://127.0.0.1:$PORT (Ctrl-C stops it)."
    wait "$SERVER"; exit $?
  fi
  sleep 0.5
done
echo "ComfyUI did not answer on port $PORT within 2 minutes." >&2
exit 1
