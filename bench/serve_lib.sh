# Shell helpers shared by the served benchmarks (bench/serve_full_size.sh, bench/dp_ep_serve.sh).
# Source it after setting PY (the python that runs eplb).

# wait_healthy PID PORT TIMEOUT_S: 0 once http://127.0.0.1:PORT/health answers 200; 1 if the
# server process PID exits first or TIMEOUT_S seconds pass.
wait_healthy() {
  local pid=$1 port=$2 timeout_s=$3 t0
  t0=$(date +%s)
  while [ $(( $(date +%s) - t0 )) -lt "$timeout_s" ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    if $PY -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=2).status_code != 200)" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  return 1
}
