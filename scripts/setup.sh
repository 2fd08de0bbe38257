#!/usr/bin/env bash
# Create .venv (once) and install eplb with its test extras.
# torch is pinned to the CPU wheel that our machines carry locally; an unpinned torch would pull
# several GB of CUDA packages. On a machine that already has torch 2.11-2.13, it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e '.[test]'
