#!/usr/bin/env bash
# GPU soak of async EPLB over NCCL: many consecutive reference runs (DP_SIZE ranks, default 2; EP, async EPLB,
# allgather_reducescatter, GSM8K eval) alternating the shipped bf16 model and its block-FP8 copy
# (quantized at run time), then two-node runs (two `eplb serve` processes, DP_SIZE / 2 GPUs each). Every
# run must finish (a run cut by RUN_TIMEOUT is a hang), reach the threshold and give exactly the
# completions of a DP 1 run of the same model.
#
# usage: scripts/integration/gpu_soak.sh            (on a machine with DP_SIZE GPUs)
# env: DP_SIZE (2), RUNS (20), TWO_NODE_RUNS (3), NUM_QUESTIONS (1319), CONCURRENCY (64), THRESHOLD (0.99),
#      PARALLEL (servers at once, each on both GPUs; default 1), RUN_TIMEOUT (s, default 420),
#      OUT_DIR (out/gpu_soak), BASE_PORT (8100), DEVICE (cuda; cpu for a smoke run),
#      REQUIRE_REBALANCE (1: a DP_SIZE run must complete a rebalance)
# Writes OUT_DIR/soak.json (per run: model, rc, hung, accuracy, completion tokens, same
# completions as DP 1, rebalances, failed) and prints its summary.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DP_SIZE=${DP_SIZE:-2}
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

one_run() {  # name model dp port [EPLB_CONFIG]
  local name=$1 model=$2 dp=$3 port=$4
  local dir="$OUT_DIR/$name"
  mkdir -p "$dir"
  EPLB_CONFIG=${5:-'{"window_size":20,"step_interval":100,"use_async":true}'} \
  OUT_DIR="$dir" MODEL="$model" DP_SIZE="$dp" \
    REQUIRE_REBALANCE=$([ "$dp" -gt 1 ] && echo "${REQUIRE_REBALANCE:-1}" || echo 0) \
    timeout -k 15 "$RUN_TIMEOUT" "$ROOT/scripts/integration/dp4_async_eplb.sh" "$THRESHOLD" \
    "$NUM_QUESTIONS" "$port" >"$dir/run.log" 2>&1
  echo $? >"$dir/rc"
}

# baselines: DP 1 of each model, and DP_SIZE of the FP8 model with EPLB that never rebalances (the
# FP8 kernels' rounding differs between the one-process and the EP path; EPLB must add nothing)
log "baselines: DP 1 (bf16, fp8), DP $DP_SIZE fp8 without rebalances"
one_run dp1-bf16 "$BF16_MODEL" 1 "$BASE_PORT" &
one_run dp1-fp8 "$FP8_MODEL" 1 $((BASE_PORT + 1)) &
REQUIRE_REBALANCE=0 one_run dpnnorebalance-fp8 "$FP8_MODEL" "$DP_SIZE" $((BASE_PORT + 2)) \
  '{"window_size":20,"step_interval":100000000,"use_async":true}' &
wait
for b in dp1-bf16 dp1-fp8; do
  if [ "$(cat "$OUT_DIR/$b/rc")" != 0 ]; then
    log "baseline $b failed: stopping"; tail -20 "$OUT_DIR/$b/run.log" >&2; exit 1
  fi
done

i=0
while [ "$i" -lt "$RUNS" ]; do
  for _ in $(seq 1 "$PARALLEL"); do
    [ "$i" -lt "$RUNS" ] || break
    if [ $((i % 2)) -eq 0 ]; then kind=bf16; model=$BF16_MODEL; else kind=fp8; model=$FP8_MODEL; fi
    log "run $i ($kind, DP $DP_SIZE)"
    one_run "run$(printf %02d "$i")-$kind" "$model" "$DP_SIZE" $((BASE_PORT + 10 + i)) &
    i=$((i + 1))
  done
  wait
done

two_node_run() {  # j
  local dir="$OUT_DIR/twonode$1-bf16"
  timeout -k 15 "$RUN_TIMEOUT" "$PY" "$ROOT/scripts/integration/two_node.py" --device "$DEVICE" \
    --dp-size "$DP_SIZE" --num-questions "$NUM_QUESTIONS" --threshold "$THRESHOLD" \
    --concurrency "$CONCURRENCY" --port $((BASE_PORT + 60 + 3 * $1)) --out-dir "$dir" \
    >"$dir.log" 2>&1
  local rc=$?
  mkdir -p "$dir"
  echo $rc >"$dir/rc"
}
j=1
while [ "$j" -le "$TWO_NODE_RUNS" ]; do
  for _ in $(seq 1 "$PARALLEL"); do
    [ "$j" -le "$TWO_NODE_RUNS" ] || break
    log "two-node run $j"
    two_node_run "$j" &
    j=$((j + 1))
  done
  wait
done

"$PY" - "$OUT_DIR" "$THRESHOLD" "$DP_SIZE" <<'PYEOF'
import json, sys
from pathlib import Path
out, threshold, dp = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])

def texts(path):
    return [json.loads(l)["text"] for l in open(path)] if path.exists() else None

def metric(path, name):
    if path.exists():
        for line in open(path):
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None

base = {k: texts(out / f"dp1-{k}" / "outputs.jsonl") for k in ("bf16", "fp8")}
ep_fp8 = texts(out / "dpnnorebalance-fp8" / "outputs.jsonl")

def differing(a, b):
    return None if a is None or b is None else sum(x != y for x, y in zip(a, b))
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
        mine = texts(d / "outputs.jsonl")
        entry["same_completions_as_dp1"] = mine == base[kind] and base[kind] is not None
        entry["answers_differing_from_dp1"] = differing(mine, base[kind])
        if kind == "fp8":
            entry["same_completions_as_dpn_without_rebalances"] = mine == ep_fp8
        same = entry["same_completions_as_dp1"] or entry.get(
            "same_completions_as_dpn_without_rebalances", False)
    else:
        rep = json.loads((d / "two_node.json").read_text()) if (d / "two_node.json").exists() else {}
        entry.update(two_node=rep, accuracy=min((e.get("accuracy") or 0)
                                                for e in rep.get("evals", [{}])),
                     same_completions_as_dp1=all(
                         texts(d / f"outputs-node{n}.jsonl") == base["bf16"] for n in (0, 1)),
                     rebalances=rep.get("rebalances"), rebalances_failed=rep.get("rebalances_failed"))
        same = entry["same_completions_as_dp1"]
    # bf16: exactly DP 1's completions; fp8: exactly those of DP_SIZE without rebalances (EPLB
    # changes nothing), whose distance to DP 1 is reported beside it
    entry["passed"] = (rc == 0 and (entry["accuracy"] or 0) >= threshold and same
                       and not entry["rebalances_failed"])
    runs.append(entry)
summary = {
    "dp_size": dp, "runs": len(runs), "passed": sum(r["passed"] for r in runs),
    "hangs": sum(r["hung"] for r in runs),
    "rank_deaths": sum(bool(r.get("rank_died")) for r in runs),
    "same_completions_as_dp1": sum(bool(r["same_completions_as_dp1"]) for r in runs),
    "min_accuracy": min((r["accuracy"] or 0) for r in runs) if runs else None,
    "fp8_dpn_without_rebalances_vs_dp1_differing_answers": differing(ep_fp8, base["fp8"]),
    "dp1": {k: (json.loads((out / f"dp1-{k}" / "gsm8k.json").read_text())
                if (out / f"dp1-{k}" / "gsm8k.json").exists() else None) for k in ("bf16", "fp8")},
}
json.dump({"summary": summary, "runs": runs}, open(out / "soak.json", "w"), indent=2)
print(json.dumps(summary))
for r in runs:
    print(f"{r['name']:18s} rc={r['rc']} acc={r['accuracy']} same_dp1={r['same_completions_as_dp1']} "
          f"same_dpn_norebalance={r.get('same_completions_as_dpn_without_rebalances')} "
          f"rebalances={r['rebalances']} failed={r['rebalances_failed']} passed={r['passed']}")
sys.exit(0 if summary["passed"] == len(runs) and runs else 1)
PYEOF
