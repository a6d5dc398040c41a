#!/usr/bin/env bash
# The main job: set up the host when needed (with the toy models), start ComfyUI with the
# Hyper-SD pack on http://127.0.0.1:${HYPERSD_PORT:-8188}, run the toy demo through it (the
# teacher at 25 steps beside few-step sampling: a labelled grid PNG and a table of seconds
# per image, accuracy and FID in ${HYPERSD_OUT:-out/demo}), then keep serving until stopped.
#
#   bash scripts/run.sh                                # toy demo, then serve
#   bash scripts/run.sh --models-dir /path/to/models   # or HYPERSD_MODELS_DIR=...: serve your own
#                                                      # SD1.5/SDXL checkpoints and LoRAs, no demo
#   HYPERSD_DEMO=0 bash scripts/run.sh                 # serve only
# Other arguments go to ComfyUI's main.py.
MODELS_DIR="${HYPERSD_MODELS_DIR:-}"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --models-dir) MODELS_DIR="${2:?--models-dir needs a folder}"; shift 2 ;;
    --models-dir=*) MODELS_DIR="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
[ -n "$MODELS_DIR" ] && MODELS_DIR="$(absolute "$MODELS_DIR")"
source "$(dirname "$0")/_env.sh"
PORT="${HYPERSD_PORT:-8188}"
OUT="$(absolute "${HYPERSD_OUT:-$HYPERSD_REPO/out/demo}")"
EXTRA=()
if [ -n "$MODELS_DIR" ]; then
  YAML="$HYPERSD_COMFYUI/../hypersd_user_models.yaml"
  (cd "$HYPERSD_REPO" && "$HYPERSD_PYTHON" -m scripts.user_models "$MODELS_DIR" "$YAML") || exit 1
  EXTRA=(--extra-model-paths-config "$YAML")
fi
# --cpu only where torch sees no GPU (or HYPERSD_DEVICE=cpu): a machine with one serves on it
DEVICE_ARGS="$(cd "$HYPERSD_REPO" && "$HYPERSD_PYTHON" -m hypersd_dev.device)" || exit 1
read -r -a DEVICE <<< "$DEVICE_ARGS"
cd "$HYPERSD_COMFYUI"
"$HYPERSD_PYTHON" main.py ${DEVICE[@]+"${DEVICE[@]}"} --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --database-url "sqlite:///$HYPERSD_COMFYUI/user/comfy.db" ${EXTRA[@]+"${EXTRA[@]}"} ${ARGS[@]+"${ARGS[@]}"} &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null' INT TERM EXIT
for _ in $(seq 1 240); do
  if ! kill -0 "$SERVER" 2>/dev/null; then echo "ComfyUI exited during start; see its log above." >&2; exit 1; fi
  if "$HYPERSD_PYTHON" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/object_info/HyperSDTCDSampler', timeout=2)" 2>/dev/null; then
    if [ -z "$MODELS_DIR" ] && [ "${HYPERSD_DEMO:-1}" != "0" ]; then
      echo "Running the toy demo (teacher at 25 steps beside few-step sampling) ..." >&2
      if ! (cd "$HYPERSD_REPO" && OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$HYPERSD_PYTHON" -m toy.demo \
           --url "http://127.0.0.1:$PORT" --out "$OUT"); then
        echo "The toy demo failed (see above); ComfyUI keeps serving." >&2
      fi
    fi
    echo "ComfyUI with the Hyper-SD pack is serving at http://127.0.0.1:$PORT (Ctrl-C stops it)."
    wait "$SERVER"; exit $?
  fi
  sleep 0.5
done
echo "ComfyUI did not answer on port $PORT within 2 minutes." >&2
exit 1
