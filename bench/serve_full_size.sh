#!/usr/bin/env bash
# `eplb serve --load-format dummy` of Qwen3-30B-A3B-FP8 and Qwen3-30B-A3B on one GPU, each load-tested
# by `eplb bench serve` (random 512-token prompts, 256 output tokens, ignore_eos) at several
# concurrencies. One GPU call; reads nothing from the network (fastapi and uvicorn must be
# importable: see docs/gpu.md for the wheels).
#
#   bash bench/serve_full_size.sh [OUT_DIR]          (default: bench/results)
# Writes two files to OUT_DIR: serve-full-size.json (every run's `eplb bench serve` JSON, in a list)
# and serve-full-size.log (the server logs); the per-run files stay in WORK (a temporary folder).
# Env: KINDS="fp8 bf16", CONCURRENCY="1 32 64 128 256", PORT=8000, INPUT_LEN=512, OUTPUT_LEN=256,
#      EXTRA_SERVE_ARGS (appended to eplb serve, e.g. "--dummy-router-skew"),
#      PROMPTS_PER_CONCURRENCY=4 (prompts per run = concurrency x this, at least 8),
#      FP8_MODEL / BF16_MODEL (other config folders, e.g. scaled-down copies for a CPU smoke test).
set -u
OUT=${1:-bench/results}
WORK=${WORK:-$(mktemp -d)}
KINDS=${KINDS:-fp8 bf16}
CONCURRENCY=${CONCURRENCY:-1 32 64 128 256}
PORT=${PORT:-8000}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-256}
PY=${PYTHON:-python3}
. "$(dirname "$0")/serve_lib.sh"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
max_c=0
for c in $CONCURRENCY; do [ "$c" -gt "$max_c" ] && max_c=$c; done
status=0
for kind in $KINDS; do
  case $kind in
    fp8) model=${FP8_MODEL:-configs/Qwen3-30B-A3B-FP8}; name=Qwen/Qwen3-30B-A3B-FP8 ;;
    bf16) model=${BF16_MODEL:-configs/Qwen3-30B-A3B}; name=Qwen/Qwen3-30B-A3B ;;
    *) echo "serve_full_size.sh: unknown kind '$kind' (allowed: fp8 bf16)" >&2; exit 2 ;;
  esac
  t0=$(date +%s)
  # shellcheck disable=SC2086
  setsid $PY -m eplb.cli serve "$model" --load-format dummy --served-model-name "$name" --port "$PORT" \
    --max-model-len $((INPUT_LEN + OUTPUT_LEN + 16)) --max-num-seqs "$max_c" --max-num-batched-tokens 8192 \
    ${EXTRA_SERVE_ARGS:-} >"$WORK/serve-$kind.log" 2>&1 &
  pid=$!
  if ! wait_healthy "$pid" "$PORT" 600; then
    echo "[$kind] server did not become healthy; last log lines:" >&2; tail -20 "$WORK/serve-$kind.log" >&2
    kill -TERM -- -"$pid" 2>/dev/null; wait "$pid" 2>/dev/null; status=1; continue
  fi
  echo "[$kind] server ready in $(( $(date +%s) - t0 )) s"
  for c in $CONCURRENCY; do
    n=$(( c * ${PROMPTS_PER_CONCURRENCY:-4} )); [ "$n" -lt 8 ] && n=8
    $PY -m eplb.cli bench serve --port "$PORT" --model "$name" --tokenizer "$model" \
      --random-input-len "$INPUT_LEN" --random-output-len "$OUTPUT_LEN" --num-prompts "$n" \
      --max-concurrency "$c" --ignore-eos --disable-tqdm --save-result --result-dir "$WORK" \
      --result-filename "$kind-c$c.json" --metadata "kind=$kind" "gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null)" \
      || status=1
  done
  kill -TERM -- -"$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
done
for kind in $KINDS; do
  [ -f "$WORK/serve-$kind.log" ] && { echo "===== eplb serve ($kind)"; cat "$WORK/serve-$kind.log"; }
done >"$OUT/serve-full-size.log"
$PY - "$WORK" "$OUT/serve-full-size.json" <<'EOF'
import glob, json, os, sys
rows, runs = [], []
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*-c*.json"))):
    d = json.load(open(p))
    runs.append(d)
    rows.append((d.get("kind", "?"), d["max_concurrency"], d["completed"], d["output_throughput"],
                 d["median_tpot_ms"], d["p99_tpot_ms"], d["median_itl_ms"], d["p99_itl_ms"], d["median_ttft_ms"]))
print("| kind | concurrency | done | output tok/s | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | ITL p99 ms | TTFT p50 ms |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in sorted(rows, key=lambda r: (r[0], r[1])):
    print("| {} | {} | {} | {:.0f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.1f} |".format(*r))
with open(sys.argv[2], "w") as f:
    json.dump(runs, f, indent=1)
print("wrote", sys.argv[2])
EOF
exit $status
