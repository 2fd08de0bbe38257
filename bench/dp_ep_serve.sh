#!/usr/bin/env bash
# `eplb serve --load-format dummy --data-parallel-size 2 --enable-expert-parallel` of
# Qwen3-30B-A3B-FP8 then Qwen3-30B-A3B under skewed dummy routing, for each
# configuration (EPLB off / sync / async, CUDA graphs or --enforce-eager) and each all2all backend,
# each load-tested by `eplb bench serve` (random 512-token prompts, 256 output tokens, ignore_eos,
# 4 x concurrency prompts) at several concurrencies, with the server's eplb_* Prometheus figures
# scraped before and after every run. Reads nothing from the network (fastapi and uvicorn must be
# importable: see docs/gpu.md for the wheels).
#
#   bash bench/dp_ep_serve.sh [OUT_DIR]          (default: bench/results)
# Writes three files to OUT_DIR, rewritten after every run (a run cut short keeps what finished):
#   dp-ep-serve.json  one dict per (model, config, backend, concurrency) run
#   dp-ep-serve.md    the same as a markdown table (also printed at the end)
#   dp-ep-serve.log   server logs and bench output of every configuration
# Per-run files stay in WORK (a temporary folder).
# Env: MODELS="fp8 bf16", FP8_MODEL / BF16_MODEL (config folders, e.g. scaled-down copies for a CPU
#      smoke test), CONFIGS="off off-eager sync async" (also sync-eager, async-eager),
#      BACKENDS=allgather_reducescatter (space separated: naive alltoall ...),
#      CONCURRENCY="16 64 256", DP_SIZE=2, PORT=8000, INPUT_LEN=512, OUTPUT_LEN=256,
#      SKEW=1.5 (--dummy-router-skew; balancedness ~0.5 at EP 2, docs/model.md), DRIFT=200
#      (--dummy-router-drift), TRACE (an .npz of --record-trace: --dummy-router-trace instead of
#      SKEW/DRIFT; its layers and experts must match each model's), EPLB_CONFIG (JSON without use_async, default
#      {"window_size":100,"step_interval":300,"num_redundant_experts":16}), OFF_BALANCEDNESS=1
#      (EPLB off records the load with --record-trace into WORK so eplb_balancedness exists; it
#      adds the [L, E] load to the per-step all-reduce, as EPLB on does), HEALTH_TIMEOUT=600 (s),
#      DEADLINE_S=0 (if > 0: start no server or run past this many seconds after the start),
#      EXTRA_SERVE_ARGS (appended to eplb serve, e.g. "--device cpu").
set -u
OUT=${1:-bench/results}
WORK=${WORK:-$(mktemp -d)}
MODELS=${MODELS:-fp8 bf16}
CONFIGS=${CONFIGS:-off off-eager sync async}
BACKENDS=${BACKENDS:-allgather_reducescatter}
CONCURRENCY=${CONCURRENCY:-16 64 256}
DP_SIZE=${DP_SIZE:-2}
PORT=${PORT:-8000}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-256}
SKEW=${SKEW:-1.5}
DRIFT=${DRIFT:-200}
if [ -n "${TRACE:-}" ]; then route_args=(--dummy-router-trace "$TRACE")
else route_args=(--dummy-router-skew "$SKEW" --dummy-router-drift "$DRIFT"); fi
EPLB_CONFIG=${EPLB_CONFIG:-'{"window_size":100,"step_interval":300,"num_redundant_experts":16}'}
OFF_BALANCEDNESS=${OFF_BALANCEDNESS:-1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-600}
DEADLINE_S=${DEADLINE_S:-0}
PY=${PYTHON:-python3}
. "$(dirname "$0")/serve_lib.sh"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DPEP_WORK=$WORK DPEP_OUT=$OUT
mkdir -p "$OUT" "$WORK"
LOG="$OUT/dp-ep-serve.log"
: >"$LOG"
start_s=$(date +%s)
max_c=0
for c in $CONCURRENCY; do [ "$c" -gt "$max_c" ] && max_c=$c; done
gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>/dev/null)
status=0
pid=""
cur_log=""
seq=0

# `eplb bench serve` with its send_request wrapped to also keep each request's wall-clock start,
# TTFT, ITLs and latency (WORK/req-TAG.json), to place requests against the rebalance windows.
BENCH_PY='
import json, os, sys, time
import eplb.benchmarks.serve as s
from eplb.cli import main
off = time.time() - time.perf_counter()
rec, orig = [], s.send_request
async def send_request(*a, **k):
    r = await orig(*a, **k)
    if r.success:
        rec.append({"start": r.start + off, "ttft": r.ttft, "latency": r.latency,
                    "output_len": r.output_len, "itl": r.itl})
    return r
s.send_request = send_request
rc = main(["bench", "serve", *sys.argv[2:]])
json.dump(rec[1:], open(sys.argv[1], "w"))  # rec[0]: the initial test request, sent alone
sys.exit(rc)
'

scrape() {  # scrape /metrics into $1 (a JSON dict of the unlabelled eplb_* samples)
  $PY - "http://127.0.0.1:$PORT/metrics" "$1" <<'EOF'
import json, sys
import httpx
out = {}
try:
    for line in httpx.get(sys.argv[1], timeout=30).text.splitlines():
        if line.startswith("eplb_") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
except Exception as exc:  # noqa: BLE001
    out["error"] = f"{type(exc).__name__}: {exc}"
json.dump(out, open(sys.argv[2], "w"))
EOF
}

summarize() {
  $PY - <<'EOF' || echo "dp_ep_serve.sh: summary failed" >&2
import datetime, glob, json, os, re
import numpy as np
work, out = os.environ["DPEP_WORK"], os.environ["DPEP_OUT"]
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*EPLB rebalance (\d+) done in ([0-9.]+)s")

def windows(log):  # wall-clock [start, end] of each completed rebalance, from rank 0's log lines
    w = []
    for line in open(log, errors="replace") if os.path.exists(log) else []:
        m = LINE.match(line)
        if m:
            end = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            w.append((end - float(m[3]), end))
    return w

def p99(xs):
    return float(np.percentile(np.asarray(xs) * 1e3, 99)) if len(xs) else None

def during(reqs, wins):
    """TPOT p99 of requests whose decode overlaps a rebalance vs the others, ITL p99 of tokens
    that arrived while one ran vs the others."""
    hot, cold, itl_hot, itl_cold = [], [], [], []
    for r in reqs:
        if r["output_len"] < 2:
            continue
        t0 = r["start"] + r["ttft"]
        t1 = r["start"] + r["latency"]
        tpot = (r["latency"] - r["ttft"]) / (r["output_len"] - 1)
        (hot if any(a < t1 and t0 < b for a, b in wins) else cold).append(tpot)
        t = t0
        for g in r["itl"]:
            t += g
            (itl_hot if any(a <= t <= b for a, b in wins) else itl_cold).append(g)
    return {"requests_during_rebalance": len(hot), "tpot_p99_during_rebalance_ms": p99(hot),
            "tpot_p99_steady_ms": p99(cold), "itl_during_rebalance": len(itl_hot),
            "itl_p99_during_rebalance_ms": p99(itl_hot), "itl_p99_steady_ms": p99(itl_cold)}

KEYS = {"balancedness": "eplb_balancedness", "rebalances": "eplb_rebalances_total",
        "rebalances_failed": "eplb_rebalances_failed_total",
        "copies_moved": "eplb_expert_copies_moved_total",
        "bytes_moved": "eplb_expert_bytes_moved_total",
        "last_rebalance_s": "eplb_last_rebalance_seconds",
        "mean_rebalance_s": "eplb_mean_rebalance_seconds", "steps": "eplb_engine_steps_total"}
runs = []
for path in glob.glob(os.path.join(work, "bench-*.json")):
    d = json.load(open(path))
    tag = d["tag"]
    load = lambda p: json.load(open(p)) if os.path.exists(p) else {}  # noqa: E731
    before, after = load(os.path.join(work, f"metrics-{tag}-before.json")), load(os.path.join(work, f"metrics-{tag}-after.json"))
    row = {k: d.get(k) for k in ("seq", "model", "config", "backend", "eplb", "graphs", "device")}
    row["seq"] = int(row["seq"])
    row["graphs"] = row["graphs"] == "on"
    row.update(concurrency=d["max_concurrency"], num_prompts=d["num_prompts"], completed=d["completed"],
               failed=d["failed"], duration_s=d["duration"], output_tok_s=d["output_throughput"],
               tpot_p50_ms=d["median_tpot_ms"], tpot_p99_ms=d["p99_tpot_ms"],
               itl_p50_ms=d["median_itl_ms"], itl_p99_ms=d["p99_itl_ms"], ttft_p50_ms=d["median_ttft_ms"])
    row["metrics"] = {k: after.get(v) for k, v in KEYS.items()}
    delta = {k: (after[KEYS[k]] - before.get(KEYS[k], 0.0)) if KEYS[k] in after else None
             for k in ("rebalances", "rebalances_failed", "copies_moved", "bytes_moved", "steps")}
    total = lambda m: m.get(KEYS["mean_rebalance_s"], 0.0) * m.get(KEYS["rebalances"], 0.0)  # noqa: E731
    secs = total(after) - total(before)
    delta["rebalance_s"] = secs
    delta["rebalance_gb_per_s"] = delta["bytes_moved"] / secs / 1e9 if delta["bytes_moved"] and secs > 0 else None
    row["metrics_delta"] = delta
    if "error" in after:
        row["metrics_error"] = after["error"]
    reqs = load(os.path.join(work, f"req-{tag}.json"))
    if d["eplb"] != "off" and reqs:
        row["in_flight"] = during(reqs, windows(os.path.join(work, f"serve-{d['server']}.log")))
    runs.append(row)
runs.sort(key=lambda r: r["seq"])
json.dump(runs, open(os.path.join(out, "dp-ep-serve.json"), "w"), indent=1)
f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
lines = ["| model | config | backend | conc | done | out tok/s | TPOT p50 | TPOT p99 | ITL p99 | "
         "balancedness | rebal (run) | GB moved | s/rebal | TPOT p99 in rebal / steady |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in runs:
    m, dl, fl = r["metrics"], r["metrics_delta"], r.get("in_flight") or {}
    gb = dl["bytes_moved"] / 1e9 if dl["bytes_moved"] is not None else None
    inf = (f"{f(fl.get('tpot_p99_during_rebalance_ms'))} / {f(fl.get('tpot_p99_steady_ms'))} "
           f"(n={fl['requests_during_rebalance']})") if fl else "-"
    lines.append(f"| {r['model']} | {r['config']} | {r['backend']} | {r['concurrency']} | "
                 f"{r['completed']}/{r['num_prompts']} | {f(r['output_tok_s'], 0)} | {f(r['tpot_p50_ms'])} | "
                 f"{f(r['tpot_p99_ms'])} | {f(r['itl_p99_ms'])} | {f(m['balancedness'], 3)} | "
                 f"{f(dl['rebalances'], 0)} | {f(gb, 3)} | {f(m['mean_rebalance_s'], 3)} | {inf} |")
open(os.path.join(out, "dp-ep-serve.md"), "w").write("\n".join(lines) + "\n")
EOF
}

stop_server() {
  [ -n "$pid" ] || return 0
  kill -TERM -- -"$pid" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "server $pid still up 30 s after TERM: KILL" >&2
    kill -KILL -- -"$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  pid=""
  if [ -n "$cur_log" ] && [ -f "$cur_log" ]; then
    { echo "===== eplb serve log: $cur_tag"; cat "$cur_log"; } >>"$LOG"
  fi
  cur_log=""
  rm -f "$WORK"/trace-*  # --record-trace output: only there so EPLB off reports balancedness
}
on_exit() { stop_server; summarize; }
trap on_exit EXIT
trap 'exit 130' INT TERM

past_deadline() { [ "$DEADLINE_S" -gt 0 ] && [ $(( $(date +%s) - start_s )) -ge "$DEADLINE_S" ]; }

for kind in $MODELS; do
  case $kind in
    fp8) model=${FP8_MODEL:-configs/Qwen3-30B-A3B-FP8}; name=Qwen/Qwen3-30B-A3B-FP8 ;;
    bf16) model=${BF16_MODEL:-configs/Qwen3-30B-A3B}; name=Qwen/Qwen3-30B-A3B ;;
    *) echo "dp_ep_serve.sh: unknown model '$kind' (allowed: fp8 bf16)" >&2; exit 2 ;;
  esac
  for backend in $BACKENDS; do
    for cfg in $CONFIGS; do
      graphs=on; eager=""
      case $cfg in *-eager) graphs=off; eager="--enforce-eager" ;; esac
      eplb_args=()
      case ${cfg%-eager} in
        off) mode=off
             [ "$OFF_BALANCEDNESS" = 1 ] && eplb_args=(--record-trace "$WORK/trace-$kind-$backend-$cfg.json") ;;
        sync) mode=sync; eplb_args=(--enable-eplb --eplb-config "${EPLB_CONFIG%\}},\"use_async\":false}") ;;
        async) mode=async; eplb_args=(--enable-eplb --eplb-config "${EPLB_CONFIG%\}},\"use_async\":true}") ;;
        *) echo "dp_ep_serve.sh: unknown config '$cfg' (allowed: off sync async, each with -eager)" >&2; exit 2 ;;
      esac
      if past_deadline; then echo "[deadline] skipping $kind $backend $cfg" | tee -a "$LOG" >&2; status=1; continue; fi
      cur_tag="$kind-$backend-$cfg"
      cur_log="$WORK/serve-$cur_tag.log"
      t0=$(date +%s)
      # shellcheck disable=SC2086
      setsid $PY -m eplb.cli serve "$model" --load-format dummy --served-model-name "$name" --port "$PORT" \
        --data-parallel-size "$DP_SIZE" --enable-expert-parallel --all2all-backend "$backend" \
        "${route_args[@]}" "${eplb_args[@]}" $eager \
        --max-model-len $((INPUT_LEN + OUTPUT_LEN + 16)) --max-num-seqs "$max_c" --max-num-batched-tokens 8192 \
        ${EXTRA_SERVE_ARGS:-} >"$cur_log" 2>&1 &
      pid=$!
      if ! wait_healthy "$pid" "$PORT" "$HEALTH_TIMEOUT"; then
        echo "[$cur_tag] server did not become healthy in $(( $(date +%s) - t0 )) s (timeout $HEALTH_TIMEOUT s); last log lines:" >&2
        tail -30 "$cur_log" >&2
        stop_server; status=1; continue
      fi
      echo "[$cur_tag] server ready in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
      for c in $CONCURRENCY; do
        if past_deadline; then echo "[deadline] skipping $cur_tag c=$c" | tee -a "$LOG" >&2; status=1; continue; fi
        seq=$((seq + 1))
        tag="$cur_tag-c$c"
        n=$(( c * 4 )); [ "$n" -lt 8 ] && n=8
        scrape "$WORK/metrics-$tag-before.json"
        echo "===== eplb bench serve: $tag" >>"$LOG"
        $PY -c "$BENCH_PY" "$WORK/req-$tag.json" --port "$PORT" --model "$name" --tokenizer "$model" \
          --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --num-prompts "$n" \
          --max-concurrency "$c" --ignore-eos --disable-tqdm --save-result --result-dir "$WORK" \
          --result-filename "bench-$tag.json" --metadata "seq=$seq" "tag=$tag" "server=$cur_tag" \
          "model=$kind" "config=$cfg" "backend=$backend" "eplb=$mode" "graphs=$graphs" "device=$gpu" \
          "dp_size=$DP_SIZE" "skew=$SKEW" "drift=$DRIFT" "trace=${TRACE:-}" "eplb_config=$EPLB_CONFIG" >>"$LOG" 2>&1 \
          || { status=1; echo "[$tag] eplb bench serve failed; see $LOG" >&2; }
        scrape "$WORK/metrics-$tag-after.json"
        summarize
      done
      stop_server
    done
  done
done
trap - EXIT
stop_server
summarize
cat "$OUT/dp-ep-serve.md"
echo "wrote $OUT/dp-ep-serve.json, $OUT/dp-ep-serve.md, $OUT/dp-ep-serve.log"
exit $status
