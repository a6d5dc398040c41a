#!/usr/bin/env bash
# Run the pack's tests against a real ComfyUI host (sets the host up first when needed).
# Extra arguments go to pytest and are relative to tests/, e.g.
#   bash scripts/test.sh -k tcd
#   bash scripts/test.sh test_sampling_core.py
source "$(dirname "$0")/_env.sh"
# pytest runs inside tests/: the repository root is the pack's package (its __init__.py is
# ComfyUI's entry point), so it must not become pytest's root; tests reach the pack through
# hypersd_dev, as toy/, bench/ and scripts/ do.
cd "$HYPERSD_REPO/tests"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
# Two workers (pytest-xdist; HYPERSD_TEST_WORKERS=0 runs in this process): the tests are
# single-threaded (OMP_NUM_THREADS=1) and wait on their ComfyUI server much of the time, so two
# at once use a 2-core machine's cores. --dist loadfile keeps each test file on one worker, so a
# file's module fixtures (an installed toy, a started server) are made once.
# --durations: the slowest tests at the end of every run (where CI time goes)
workers="${HYPERSD_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != "0" ]; then parallel=(-n "$workers" --dist loadfile); fi
exec "$HYPERSD_PYTHON" -m pytest -c pytest.ini --rootdir . -q --durations=15 "${parallel[@]}" "$@"
