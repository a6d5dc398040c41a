# Sourced by run.sh and test.sh: sets up the host (idempotent) and exports
# HYPERSD_PYTHON and HYPERSD_COMFYUI.
set -euo pipefail
HYPERSD_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export HYPERSD_REPO
_setup_out="$(python3 "$HYPERSD_REPO/scripts/setup_host.py")" || {
  echo "Host set-up failed; see the message above." >&2
  exit 1
}
HYPERSD_PYTHON="$(printf '%s\n' "$_setup_out" | sed -n 's/^HYPERSD_PYTHON=//p')"
HYPERSD_COMFYUI="$(printf '%s\n' "$_setup_out" | sed -n 's/^HYPERSD_COMFYUI=//p')"
export HYPERSD_PYTHON HYPERSD_COMFYUI
