#!/usr/bin/env bash
# The main job: set up, then the reference scenario (DP=4, EP, async EPLB, allgather_reducescatter)
# on the shipped model: start the server, wait for /health, run the GSM8K eval, assert accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT_DIR=${OUT_DIR:-out/reference} scripts/integration/dp4_async_eplb.sh "${1:-0.8}" "${2:-1319}" "${3:-8050}"
