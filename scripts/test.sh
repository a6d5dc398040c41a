#!/usr/bin/env bash
# Run the pack's tests against a real ComfyUI host (sets the host up first when needed).
# Extra arguments go to pytest, e.g. scripts/test.sh -k sampler
source "$(dirname "$0")/_env.sh"
cd "$HYPERSD_REPO"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
exec "$HYPERSD_PYTHON" -m pytest -c tests/pytest.ini --rootdir tests -q "$@"
