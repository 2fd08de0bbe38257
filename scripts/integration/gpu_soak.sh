#!/usr/bin/env bash
# GPU soak of async EPLB over NCCL: many consecutive reference runs (DP 2, EP, async EPLB,
# allgather_reducescatter, GSM8K eval) alternating the shipped bf16 model and its block-FP8 copy
# (quantized at run time), then two-node runs (two `eplb serve` processes, one GPU each). Every
# run must finish (a run cut by RUN_TIMEOUT is a hang), reach the threshold and give exactly the
# completions of a DP 1 run of the same model.
#
# usage: scripts/integration/gpu_soak.sh            (on a machine with 2 GPUs)
# env: RUNS (20), TWO_NODE_RUNS (3), NUM_QUESTIONS (1319), CONCURRENCY (64), THRESHOLD (0.99),
#      PARALLEL (servers at once, each on both GPUs; default 1), RUN_TIMEOUT (s, default 420),
#      OUT_DIR (out/gpu_soak), BASE_PORT (8100), DEVICE (cuda; cpu for a smoke run),
#      REQUIRE_REBALANCE (1: a DP 2 run must complete a rebalance)
# Writes OUT_DIR/soak.json (per run: model, rc, hung, accuracy, completion tokens, same
# completions as DP 1, rebalances, failed) and prints its summary.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${RUNS:-20}
TWO_NODE_RUNS=${TWO_NODE_RUNS:-3}
NUM_QUESTIONS=${NUM_QUESTIONS:-1319}
CONCURRENCY=${CONCURRENCY:-64}
THRESHOLD=${THRESHOLD:-0.99}
PARALLEL=${PARALLEL:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-420}
OUT_DIR=${OUT_DIR:-out/gpu_soak}
BASE_PORT=${BASE_PORT:-8100}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
export DEVICE CONCURRENCY
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
log() { echo "[gpu_soak $(date -u +%H:%M:%S)] $*" >&2; }

FP8_MODEL="$OUT_DIR/tiny-qwen3-moe-fp8"
BF16_MODEL=$("$PY" -c "from eplb.server.serve_cli import resolve_model; print(resolve_model(None))")
[ -d "$FP8_MODEL" ] || "$PY" -c "
from eplb.model.quantize import quantize_checkpoint_fp8
quantize_checkpoint_fp8('$BF16_MODEL', '$FP8_MODEL')"

one_run() {  # name model dp port [extra env...]
  local name=$1 model=$2 dp=$3 port=$4
  local dir="$OUT_DIR/$name"
  mkdir -p "$dir"
  OUT_DIR="$dir" MODEL="$model" DP_SIZE="$dp" \
    REQUIRE_REBALANCE=$([ "$dp" -gt 1 ] && echo "${REQUIRE_REBALANCE:-1}" || echo 0) \
    timeout -k 15 "$RUN_TIMEOUT" "$ROOT/scripts/integration/dp4_async_eplb.sh" "$THRESHOLD" \
    "$NUM_QUESTIONS" "$port" >"$dir/run.log" 2>&1
  echo $? >"$dir/rc"
}

log "DP 1 baselines (bf16, fp8)"
one_run dp1-bf16 "$BF16_MODEL" 1 "$BASE_PORT" &
one_run dp1-fp8 "$FP8_MODEL" 1 $((BASE_PORT + 1)) &
wait

i=0
while [ "$i" -lt "$RUNS" ]; do
  for _ in $(seq 1 "$PARALLEL"); do
    [ "$i" -lt "$RUNS" ] || break
    if [ $((i % 2)) -eq 0 ]; then kind=bf16; model=$BF16_MODEL; else kind=fp8; model=$FP8_MODEL; fi
    log "run $i ($kind, DP 2)"
    one_run "run$(printf %02d "$i")-$kind" "$model" 2 $((BASE_PORT + 10 + i)) &
    i=$((i + 1))
  done
  wait
done

for j in $(seq 1 "$TWO_NODE_RUNS"); do
  log "two-node run $j"
  dir="$OUT_DIR/twonode$j-bf16"
  timeout -k 15 "$RUN_TIMEOUT" "$PY" "$ROOT/scripts/integration/two_node.py" --device "$DEVICE" \
    --dp-size 2 --num-questions "$NUM_QUESTIONS" --threshold "$THRESHOLD" \
    --concurrency "$CONCURRENCY" --port $((BASE_PORT + 60 + 3 * j)) --out-dir "$dir" \
    >"$dir.log" 2>&1
  rc=$?
  mkdir -p "$dir"
  echo $rc >"$dir/rc"
done

"$PY" - "$OUT_DIR" "$THRESHOLD" <<'PYEOF'
import json, sys
from pathlib import Path
out, threshold = Path(sys.argv[1]), float(sys.argv[2])

def texts(path):
    return [json.loads(l)["text"] for l in open(path)] if path.exists() else None

def metric(path, name):
    if path.exists():
        for line in open(path):
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None

base = {k: texts(out / f"dp1-{k}" / "outputs.jsonl") for k in ("bf16", "fp8")}
runs = []
for d in sorted(out.iterdir()):
    if not d.is_dir() or not (d.name.startswith("run") or d.name.startswith("twonode")):
        continue
    kind = d.name.rsplit("-", 1)[1]
    rc = int((d / "rc").read_text()) if (d / "rc").exists() else None
    entry = {"name": d.name, "kind": kind, "rc": rc, "hung": rc in (124, 137)}
    if d.name.startswith("run"):
        res = json.loads((d / "gsm8k.json").read_text()) if (d / "gsm8k.json").exists() else {}
        entry.update(accuracy=res.get("accuracy"), completion_tokens=res.get("completion_tokens"),
                     rebalances=metric(d / "metrics.txt", "eplb_rebalances_total"),
                     rebalances_failed=metric(d / "metrics.txt", "eplb_rebalances_failed_total"),
                     rank_died="died" in (d / "server.log").read_text()
                     if (d / "server.log").exists() else None)
        entry["same_completions_as_dp1"] = (texts(d / "outputs.jsonl") == base[kind]
                                            and base[kind] is not None)
    else:
        rep = json.loads((d / "two_node.json").read_text()) if (d / "two_node.json").exists() else {}
        entry.update(two_node=rep, accuracy=min((e.get("accuracy") or 0)
                                                for e in rep.get("evals", [{}])),
                     same_completions_as_dp1=all(
                         texts(d / f"outputs-node{n}.jsonl") == base["bf16"] for n in (0, 1)),
                     rebalances=rep.get("rebalances"), rebalances_failed=rep.get("rebalances_failed"))
    entry["passed"] = (rc == 0 and (entry["accuracy"] or 0) >= threshold
                       and entry["same_completions_as_dp1"])
    runs.append(entry)
summary = {
    "runs": len(runs), "passed": sum(r["passed"] for r in runs),
    "hangs": sum(r["hung"] for r in runs),
    "rank_deaths": sum(bool(r.get("rank_died")) for r in runs),
    "same_completions_as_dp1": sum(bool(r["same_completions_as_dp1"]) for r in runs),
    "min_accuracy": min((r["accuracy"] or 0) for r in runs) if runs else None,
    "dp1": {k: (json.loads((out / f"dp1-{k}" / "gsm8k.json").read_text())
                if (out / f"dp1-{k}" / "gsm8k.json").exists() else None) for k in ("bf16", "fp8")},
}
json.dump({"summary": summary, "runs": runs}, open(out / "soak.json", "w"), indent=2)
print(json.dumps(summary))
for r in runs:
    print(f"{r['name']:18s} rc={r['rc']} acc={r['accuracy']} same={r['same_completions_as_dp1']} "
          f"rebalances={r['rebalances']} failed={r['rebalances_failed']} passed={r['passed']}")
sys.exit(0 if summary["passed"] == len(runs) and runs else 1)
PYEOF
