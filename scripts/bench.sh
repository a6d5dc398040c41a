#!/usr/bin/env bash
# Every benchmark in bench/, then one dated results page with plots (set-up first when needed):
#   bash scripts/bench.sh            # the published numbers: bench/results/README.md (hours: the
#                                    # quality table is 500 images x 3 seed sets a row)
#   bash scripts/bench.sh --quick    # a few minutes, small samples: bench/results/quick/README.md
# Each benchmark writes bench/results[/quick]/<name>.json (figures, settings, machine);
# bench/render.py turns them into the page. A benchmark that fails is reported and skipped.
source "$(dirname "$0")/_env.sh"
QUICK=()
OUT="$HYPERSD_REPO/bench/results"
if [ "${1:-}" = "--quick" ]; then QUICK=(--quick); OUT="$OUT/quick"; shift; fi
[ $# -eq 0 ] || { echo "usage: bash scripts/bench.sh [--quick]" >&2; exit 2; }
mkdir -p "$OUT"
cd "$HYPERSD_REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
FAILED=()
run() {
  local name="$1"; shift
  echo "[bench] $name: $*" >&2
  local t0=$SECONDS
  if "$HYPERSD_PYTHON" -m "$@" ${QUICK[@]+"${QUICK[@]}"} --json "$OUT/$name.json"; then
    echo "[bench] $name done in $((SECONDS - t0)) s" >&2
  else
    echo "[bench] $name FAILED (see above); the page leaves it out" >&2
    FAILED+=("$name")
    rm -f "$OUT/$name.json"
  fi
}
run sampling bench.bench_sampling
run lora_load bench.bench_lora_load
run training_cost bench.bench_tscd
run distributed bench.bench_distributed --shard-base
if "$HYPERSD_PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  run distributed_gpu bench.bench_distributed --devices cuda,cpu  # CUDA beside this machine's cores
fi
run quality bench.bench_tscd --quality --repeats 3 --unified-etas 0.3,0.6,1 \
  --feedback toy/weights/hypersd_toy_feedback_lora_k4_feedback.safetensors,toy/weights/hypersd_toy_feedback_lora_k2_feedback.safetensors,toy/weights/hypersd_toy_feedback_lora_unified_feedback.safetensors
run preference bench.bench_preference --grid "$OUT/preference_grid.png"
run demo bench.bench_demo --out "$OUT/demo"
run soak bench.soak
run crash bench.crash
"$HYPERSD_PYTHON" -m bench.render "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then echo "[bench] failed: ${FAILED[*]}" >&2; exit 1; fi
