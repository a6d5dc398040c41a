#!/usr/bin/env bash
# The checks that need a GPU, in one command, on a machine where torch sees CUDA:
#   bash scripts/gpu_check.sh [OUT]        (OUT: where the logs and result files go; default out/gpu)
# 1. the in-process tests on CUDA (the tests' ComfyUI follows HYPERSD_DEVICE, unset: the GPU),
#    those that train, sample and load (the page and server tests need nothing a GPU changes);
# 2. bench_distributed on CUDA beside this machine's cores, and bench_tscd's cost table on CUDA,
#    as bench/results/*_gpu.json files (copy them to bench/results/ and render the page).
# Uses the set-up's Python (HYPERSD_PYTHON, else .venv/bin/python) and ComfyUI (HYPERSD_COMFYUI).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$REPO/out/gpu}"
PY="${HYPERSD_PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$OUT"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset HYPERSD_DEVICE
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: nothing to check')" || exit 2
status=0
"$PY" -m bench.bench_distributed --devices cuda,cpu --json "$OUT/distributed_gpu.json" 2>&1 | tee "$OUT/distributed.log" || status=1
"$PY" -m bench.bench_tscd --device cuda --json "$OUT/training_cost_gpu.json" 2>&1 | tee "$OUT/training_cost.log" || status=1
(cd tests && "$PY" -m pytest -c pytest.ini --rootdir . -q -rfE --junitxml "$OUT/junit.xml" \
  test_tscd_node.py test_feedback_node.py test_train_command.py test_tscd_prompts.py test_sampling_comfy.py \
  test_lora_loader.py test_aesthetic_reward.py test_pipeline.py test_dmd_core.py test_feedback_core.py \
  -k "not server" 2>&1 | tee "$OUT/tests.log") || status=1
exit $status
