#!/usr/bin/env bash
# The seed's exact run on DP_SIZE GPUs of one host (default 4): DP + EP + async EPLB, checked and
# measured, in two parts that each fit a 10-minute job:
#   soak   scripts/integration/gpu_soak.sh at DP_SIZE: RUNS reference runs (async EPLB
#          {"window_size":20,"step_interval":100}, allgather_reducescatter, GSM8K eval of
#          NUM_QUESTIONS) alternating the shipped model and its block-FP8 copy; each must finish,
#          reach THRESHOLD and give exactly the completions of one GPU (gpu_soak.sh's rules);
#   serve  bench/dp_ep_serve.sh at DP_SIZE on the full-size Qwen3-30B-A3B(-FP8) shape (dummy
#          weights, skewed routers): EPLB off / sync / async for each all2all backend, `eplb bench
#          serve` at SERVE_CONCURRENCY, with balancedness and the rebalances' time and GB/s.
# Then both parts' results (whatever exists) are merged into OUT_DIR/multi-gpu.json with the GPU
# name, torch version, date and settings (copy it to bench/results/multi-gpu-h200x4.json).
#
# usage: scripts/integration/multi_gpu.sh                      (PART=all)
#        PART=soak scripts/integration/multi_gpu.sh; PART=serve ...; PART=merge ...
# env: DP_SIZE (4), PART (all | soak | serve | merge), OUT_DIR (out/multi_gpu), RUNS (10),
#      TWO_NODE_RUNS (0), NUM_QUESTIONS (1319), THRESHOLD (0.99), MODELS (fp8), CONFIGS
#      ("off sync async"), BACKENDS ("allgather_reducescatter alltoall"), SERVE_CONCURRENCY
#      ("64 256"), EVAL_CONCURRENCY (64, the soak's eval requests in flight),
#      DEADLINE_S (0 = none; passed to dp_ep_serve.sh), and anything gpu_soak.sh or
#      dp_ep_serve.sh read (DEVICE, EXTRA_SERVE_ARGS, FP8_MODEL, INPUT_LEN, ...).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
export DP_SIZE=${DP_SIZE:-4}
PART=${PART:-all}
OUT_DIR=${OUT_DIR:-out/multi_gpu}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
case $PART in all|soak|serve|merge) ;; *) echo "multi_gpu.sh: PART must be all, soak, serve or merge, got '$PART'" >&2; exit 2 ;; esac
status=0
if [ "$PART" = all ] || [ "$PART" = soak ]; then
  RUNS=${RUNS:-10} TWO_NODE_RUNS=${TWO_NODE_RUNS:-0} OUT_DIR="$OUT_DIR/soak" CONCURRENCY=${EVAL_CONCURRENCY:-64} \
    bash "$ROOT/scripts/integration/gpu_soak.sh" || status=1
fi
if [ "$PART" = all ] || [ "$PART" = serve ]; then
  MODELS=${MODELS:-fp8} CONFIGS=${CONFIGS:-off sync async} \
    BACKENDS=${BACKENDS:-allgather_reducescatter alltoall} CONCURRENCY=${SERVE_CONCURRENCY:-64 256} \
    bash "$ROOT/bench/dp_ep_serve.sh" "$OUT_DIR/serve" || status=1
fi
"$PY" - "$OUT_DIR" <<'PYEOF' || status=1
import datetime, json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    version = torch.__version__
except ImportError:
    gpu, version = None, None
def load(p):
    return json.loads(p.read_text()) if p.exists() else None
env = {k: os.environ.get(k) for k in ("DP_SIZE", "RUNS", "NUM_QUESTIONS", "THRESHOLD", "MODELS", "CONFIGS",
                                      "BACKENDS", "SERVE_CONCURRENCY", "EVAL_CONCURRENCY", "EXTRA_SERVE_ARGS")
       if os.environ.get(k)}
result = {"device": gpu, "torch": version, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "command": "scripts/integration/multi_gpu.sh", "env": env,
          "soak": load(out / "soak" / "soak.json"), "serve": load(out / "serve" / "dp-ep-serve.json")}
(out / "multi-gpu.json").write_text(json.dumps(result, indent=1))
soak = (result["soak"] or {}).get("summary")
print("soak:", json.dumps(soak) if soak else "none")
print("serve runs:", len(result["serve"] or []))
print("wrote", out / "multi-gpu.json")
PYEOF
exit $status
