#!/usr/bin/env bash
# The test job: set up, lint (ruff), run the unit/multi-process suite, then the reference scenario on
# CPU with enough questions that async EPLB rebalances several times during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
python scripts/check_type_hints.py  # every public function carries type hints
# Without a GPU the Triton kernel tests run under triton's interpreter (tiny shapes, ~30 s).
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=1
fi
python -m pytest
OUT_DIR=${OUT_DIR:-out/ci} scripts/integration/dp4_async_eplb.sh 0.8 "${CI_NUM_QUESTIONS:-200}" "${CI_PORT:-8050}"
