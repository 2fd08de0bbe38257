#!/usr/bin/env python3
"""Two `eplb serve` processes as two nodes of one DP/EP job, both serving, with async EPLB.

Node i runs `eplb serve --node-rank i --data-parallel-size DP --data-parallel-size-local DP/2
--data-parallel-address 127.0.0.1 --data-parallel-rpc-port RPC` with its HTTP API on PORT+i;
the ranks of both nodes form one process group (gloo on CPU, NCCL on CUDA, where node i sees
GPUs i*DP/2 .. through CUDA_VISIBLE_DEVICES). Once both are healthy, one GSM8K eval runs
against EACH front at the same time; every eval must reach the threshold. Then node 0 is
stopped: its stop reaches node 1's ranks through the per-step all-reduce, so node 1 must exit
by itself with code 0 (a supervisor would not restart it). No process may be left behind.

usage: two_node.py [--threshold 0.8] [--num-questions N] [--port P] [--device cpu|cuda]
                   [--dp-size 4] [--model DIR] [--eplb-config JSON] [--out-dir DIR]
Prints one JSON line (and writes OUT_DIR/two_node.json); exit code 0 iff everything held.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REFERENCE_EPLB = '{"window_size":20,"step_interval":100,"use_async":true}'


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except Exception:  # noqa: BLE001 - not up yet / refused
        return 0, ""


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _stop(proc: subprocess.Popen, grace_s: float) -> int:
    """TERM, wait, then KILL the whole process group; the exit code (or -9)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return -9


def _leftovers(pgid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-g", str(pgid), "-a"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines()
            if line.strip() and "<defunct>" not in line]  # zombies await their reaper only


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--num-questions", type=int, default=100)
    p.add_argument("--port", type=int, default=8060)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dp-size", type=int, default=4)
    p.add_argument("--model", default=None)
    p.add_argument("--eplb-config", default=REFERENCE_EPLB)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out-dir", default="out/two_node")
    p.add_argument("--health-timeout", type=float, default=600.0)
    p.add_argument("--extra-serve-args", default="", help="more `eplb serve` flags, word-split")
    args = p.parse_args()
    if args.dp_size % 2:
        p.error(f"--dp-size must be even (two nodes), got {args.dp_size}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    local = args.dp_size // 2
    rpc = args.port + 2
    eplb = [sys.executable, "-m", "eplb"]
    procs: list[subprocess.Popen] = []
    report: dict = {"device": args.device, "dp_size": args.dp_size, "nodes": 2, "ok": False}
    try:
        for node in range(2):
            env = dict(os.environ)
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * local + i) for i in range(local))
            cmd = [*eplb, "serve", *([args.model] if args.model else []),
                   "--host", "127.0.0.1", "--port", str(args.port + node),
                   "--node-rank", str(node), "--data-parallel-size", str(args.dp_size),
                   "--data-parallel-size-local", str(local),
                   "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc),
                   "--enable-expert-parallel", "--enable-eplb", "--eplb-config", args.eplb_config,
                   "--all2all-backend", "allgather_reducescatter", "--max-model-len", "2048",
                   "--device", args.device, *args.extra_serve_args.split()]
            log = open(out / f"node{node}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        deadline = time.monotonic() + args.health_timeout
        for node, proc in enumerate(procs):
            while _get(f"http://127.0.0.1:{args.port + node}/health")[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    report["error"] = f"node {node} never became healthy (exit {proc.poll()})"
                    return _finish(report, out, procs)
                time.sleep(1)

        def run_eval(node: int) -> dict:
            res = out / f"gsm8k-node{node}.json"
            cmd = [*eplb, "eval", "gsm8k", "--host", "http://127.0.0.1", "--port",
                   str(args.port + node), "--dataset", "synthetic", "--num-questions",
                   str(args.num_questions), "--num-shots", "5", "--max-tokens", "256",
                   "--temperature", "0", "--seed", "42", "--concurrency",
                   str(args.concurrency), "--save-results", str(res),
                   "--save-outputs", str(out / f"outputs-node{node}.jsonl")]
            rc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True).returncode
            data = json.loads(res.read_text()) if res.exists() else {}
            return {"rc": rc, "accuracy": data.get("accuracy"),
                    "completion_tokens": data.get("completion_tokens")}

        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            evals = list(pool.map(run_eval, range(2)))
        report["eval_s"] = round(time.monotonic() - t0, 1)
        report["evals"] = evals
        text = _get(f"http://127.0.0.1:{args.port}/metrics", 30)[1]
        report["rebalances"] = _metric(text, "eplb_rebalances_total")
        report["rebalances_failed"] = _metric(text, "eplb_rebalances_failed_total")
        report["copies_moved"] = _metric(text, "eplb_expert_copies_moved_total")
        # node 0 stops; node 1 must follow by itself, cleanly
        report["exit_node0"] = _stop(procs[0], 30)
        try:
            report["exit_node1"] = procs[1].wait(30)
        except subprocess.TimeoutExpired:
            report["exit_node1"] = f"still running 30 s after node 0 stopped: {_stop(procs[1], 10)}"
        report["leftover_processes"] = [x for proc in procs for x in _leftovers(proc.pid)]
        report["ok"] = (all(e["rc"] == 0 and (e["accuracy"] or 0) >= args.threshold
                            for e in evals)
                        # uvicorn re-raises the SIGTERM it handled: -15 is its clean exit
                        and report["exit_node0"] in (0, -signal.SIGTERM)
                        and report["exit_node1"] == 0
                        and report["rebalances"] > 0 and report["rebalances_failed"] == 0
                        and not report["leftover_processes"])
        return _finish(report, out, procs)
    except BaseException as exc:
        report["error"] = repr(exc)
        return _finish(report, out, procs)


def _finish(report: dict, out: Path, procs: list[subprocess.Popen]) -> int:
    for proc in procs:
        if proc.poll() is None:
            _stop(proc, 15)
    (out / "two_node.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
