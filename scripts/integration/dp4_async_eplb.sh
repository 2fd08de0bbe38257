#!/usr/bin/env bash
# The reference scenario end to end: `eplb serve` with DP 4, EP, async EPLB
# ({"window_size":20,"step_interval":100,"use_async":true}) and the allgather_reducescatter
# backend; wait for /health; run `eplb eval gsm8k`; assert accuracy >= THRESHOLD; check in
# /metrics that async rebalances completed and moved expert copies. The server is always stopped
# on exit (TERM, then KILL of its whole process group after 10 s).
#
# usage: scripts/integration/dp4_async_eplb.sh [THRESHOLD=0.8] [NUM_QUESTIONS=1319] [PORT=8050]
# environment (all optional):
#   OUT_DIR          where server.log, gsm8k.json, outputs.jsonl, metrics.txt go
#                    (default: out/dp4_async_eplb)
#   MODEL            model directory (default: the shipped tiny-qwen3-moe)
#   DEVICE           auto | cpu | cuda (default: auto)
#   DP_SIZE          data-parallel ranks (default: 4)
#   EPLB_CONFIG      --eplb-config JSON (default: the reference one above)
#   DATASET          synthetic | gsm8k (default: synthetic)
#   CONCURRENCY      eval requests in flight (default: 16: on a CPU this gives ~2.5 forward
#                    steps per question, so 200 questions see ~5 rebalances at step_interval 100)
#   EVAL_MAX_TOKENS  max tokens per answer (default: 256)
#   HEALTH_TIMEOUT   seconds to wait for /health (default: 600)
#   EXTRA_SERVE_ARGS more `eplb serve` flags, word-split (e.g. "--enforce-eager")
#   REQUIRE_REBALANCE  1 = fail without a completed rebalance, 0 = only report,
#                    auto (default) = require it when the run took >= 2 x step_interval steps
#                    (or, when the server does not report steps, NUM_QUESTIONS >= 100)
set -euo pipefail

THRESHOLD=${1:-0.8}
NUM_QUESTIONS=${2:-1319}
PORT=${3:-8050}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT_DIR=${OUT_DIR:-out/dp4_async_eplb}
MODEL=${MODEL:-}
DEVICE=${DEVICE:-auto}
DP_SIZE=${DP_SIZE:-4}
EPLB_CONFIG=${EPLB_CONFIG:-'{"window_size":20,"step_interval":100,"use_async":true}'}
DATASET=${DATASET:-synthetic}
CONCURRENCY=${CONCURRENCY:-16}
EVAL_MAX_TOKENS=${EVAL_MAX_TOKENS:-256}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
REQUIRE_REBALANCE=${REQUIRE_REBALANCE:-auto}

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SERVER_LOG="$OUT_DIR/server.log"
RESULTS="$OUT_DIR/gsm8k.json"
METRICS="$OUT_DIR/metrics.txt"

# The eplb command: on PATH (venv activated), else the repo's venv.
if command -v eplb >/dev/null 2>&1; then
  EPLB=(eplb)
  PY=$(command -v python3 || command -v python)
  [ -x "$(dirname "$(command -v eplb)")/python" ] && PY="$(dirname "$(command -v eplb)")/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
  EPLB=("$PY" -m eplb)
else
  echo "FAIL: no 'eplb' on PATH and no $ROOT/.venv; run scripts/setup.sh first" >&2
  exit 1
fi

log() { echo "[dp4_async_eplb $(date -u +%H:%M:%S)] $*" >&2; }

SERVER_PID=""
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping the server (pid $SERVER_PID): TERM"
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      log "server still up after 10 s: KILL (its whole process group)"
      kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
  fi
  # rank processes live in the server's process group (setsid): none may outlive the run.
  # Give exiting helpers (e.g. multiprocessing's resource tracker) a few seconds first.
  if [ -n "$SERVER_PID" ]; then
    for _ in $(seq 1 50); do
      pgrep -g "$SERVER_PID" >/dev/null 2>&1 || break
      sleep 0.1
    done
    if pgrep -g "$SERVER_PID" >/dev/null 2>&1; then
      log "leftover processes in group $SERVER_PID: $(pgrep -g "$SERVER_PID" -a | tr '\n' ';' | cut -c1-300); KILL"
      kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
      [ "$rc" -eq 0 ] && rc=1  # a clean run leaves nothing behind
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SERVE_ARGS=()
[ -n "$MODEL" ] && SERVE_ARGS+=("$MODEL")
SERVE_ARGS+=(--host 127.0.0.1 --port "$PORT"
  --data-parallel-size "$DP_SIZE" --enable-expert-parallel
  --enable-eplb --eplb-config "$EPLB_CONFIG"
  --all2all-backend allgather_reducescatter
  --max-model-len 2048 --device "$DEVICE" ${EXTRA_SERVE_ARGS:-})

log "server: ${EPLB[*]} serve ${SERVE_ARGS[*]} (log: $SERVER_LOG)"
START=$(date +%s)
# setsid: the server leads its own process group, so the KILL fallback reaches its ranks too
if command -v setsid >/dev/null 2>&1; then
  setsid "${EPLB[@]}" serve "${SERVE_ARGS[@]}" >"$SERVER_LOG" 2>&1 &
else
  "${EPLB[@]}" serve "${SERVE_ARGS[@]}" >"$SERVER_LOG" 2>&1 &
fi
SERVER_PID=$!

log "waiting for http://127.0.0.1:$PORT/health (up to ${HEALTH_TIMEOUT}s)"
DEADLINE=$(( $(date +%s) + HEALTH_TIMEOUT ))
until [ "$("$PY" - "$PORT" <<'EOF'
import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5).status)
except Exception:
    print(0)
EOF
)" = "200" ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "FAIL: the server exited before it was healthy; last log lines:"
    tail -n 30 "$SERVER_LOG" >&2
    SERVER_PID=""
    exit 1
  fi
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then
    log "FAIL: /health not 200 after ${HEALTH_TIMEOUT}s; last log lines:"
    tail -n 30 "$SERVER_LOG" >&2
    exit 1
  fi
  sleep 1
done
READY=$(date +%s)
log "server healthy after $((READY - START))s"

log "eval: $NUM_QUESTIONS questions ($DATASET), concurrency $CONCURRENCY"
"${EPLB[@]}" eval gsm8k --host http://127.0.0.1 --port "$PORT" --dataset "$DATASET" \
  --num-questions "$NUM_QUESTIONS" --num-shots 5 --max-tokens "$EVAL_MAX_TOKENS" \
  --temperature 0 --seed 42 --concurrency "$CONCURRENCY" --save-results "$RESULTS" \
  --save-outputs "$OUT_DIR/outputs.jsonl"
EVAL_END=$(date +%s)

"$PY" - "$PORT" "$METRICS" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=30).read().decode()
open(sys.argv[2], "w").write(text)
EOF
log "EPLB metrics after the eval:"
grep -E '^eplb_(rebalances|expert_|last_rebalance|mean_rebalance|balancedness|engine_steps)' "$METRICS" >&2 || true

"$PY" - "$RESULTS" "$METRICS" "$THRESHOLD" "$NUM_QUESTIONS" "$EPLB_CONFIG" "$REQUIRE_REBALANCE" \
  "$((EVAL_END - READY))" <<'EOF'
import json, sys
results, metrics, threshold, num_q, eplb_cfg, require, eval_s = sys.argv[1:8]
res = json.load(open(results))
values = {}
for line in open(metrics):
    if line.startswith("eplb_") and "{" not in line:
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
acc = res["accuracy"]
rebalances = values.get("eplb_rebalances_total", 0.0)
copies = values.get("eplb_expert_copies_moved_total", 0.0)
failed = values.get("eplb_rebalances_failed_total", 0.0)
steps = values.get("eplb_engine_steps_total")
interval = json.loads(eplb_cfg).get("step_interval", 3000)
if require == "auto":
    long_enough = steps >= 2 * interval if steps is not None else int(num_q) >= 100
else:
    long_enough = require == "1"
print(f"accuracy={acc:.4f} (threshold {threshold}) questions={res['num_questions']} "
      f"eval_s={eval_s} qps={res['questions_per_second']:.2f} rebalances={rebalances:.0f} "
      f"failed={failed:.0f} copies_moved={copies:.0f} steps={steps if steps is None else int(steps)}")
ok = True
if acc < float(threshold):
    print(f"FAIL: accuracy {acc:.4f} < threshold {threshold}")
    ok = False
if copies <= 0 or rebalances <= 0:
    if long_enough:
        print("FAIL: no completed EPLB rebalance moved expert copies during the run")
        ok = False
    else:
        print("note: no completed rebalance yet (run too short to require one)")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
