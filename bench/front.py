"""CPU the server's front process spends per streamed token, with uvicorn on the pure-Python stack
(asyncio event loop, h11 parser) against uvloop + httptools (what ``--uvicorn-loop/--uvicorn-http
auto`` pick when installed), and the latter with ``--stream-interval 4`` (a chunk every 4
tokens, vLLM's flag), same run.

    PYTHONPATH=src python bench/front.py [--concurrency 64,256] [--output-len 64] [--settings A,B,...]

``--settings`` picks and orders the stacks (the first is the baseline); ``uvloop+h11`` (uvloop
without httptools, as on an image that lacks the httptools wheel) is not in the default set.

For each setting and concurrency: ``eplb serve`` of the shipped model on the CPU, loaded by
``eplb bench serve`` (streaming completions, random 32-token prompts, ``--ignore-eos``, two
prompts per stream slot). The front process is pinned to CPU 0, its ranks and the load client to
the other CPUs, so the front's CPU time is its own. Figures: the front's CPU microseconds per
streamed token (its user + system time over the load, from /proc), its milliseconds per engine
step (steps from /metrics), and the ratio of the baseline's figure to this one; and the load
client's CPU per token (start-up included, ~0.8 s here), which bounds what one client process
can measure. At the full-size
model's ~15-20 ms decode step on a GPU, a front that needs more than that per step at the
step's batch size cannot keep up. Linux only (/proc, CPU affinity). Writes
bench/results/front.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)
sys.path.insert(0, HERE)

from machine import write_rows  # noqa: E402

from eplb.parallel.groups import find_free_port  # noqa: E402

# name -> (--uvicorn-loop, --uvicorn-http, --stream-interval)
SETTINGS = {"asyncio+h11": ("asyncio", "h11", 1), "uvloop+httptools": ("auto", "auto", 1),
            "uvloop+httptools, interval 4": ("auto", "auto", 4),
            # an image with uvloop but without httptools (the GPU machines' before the wheel is carried)
            "uvloop+h11": ("uvloop", "h11", 1)}
DEFAULT_SETTINGS = "asyncio+h11,uvloop+httptools,uvloop+httptools, interval 4"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _steps(port: int) -> float:
    for line in _get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith("eplb_engine_steps_total"):
            return float(line.split()[1])
    raise RuntimeError("no eplb_engine_steps_total in /metrics")


def run(setting: str, concurrency: int, output_len: int, others: set[int], env: dict) -> dict:
    loop, http, interval = SETTINGS[setting]
    port = find_free_port()
    cmd = [sys.executable, "-m", "eplb.cli", "serve", "--port", str(port), "--max-num-seqs", str(concurrency),
           "--max-num-batched-tokens", "8192", "--max-model-len", str(64 + output_len),
           "--uvicorn-loop", loop, "--uvicorn-http", http, "--stream-interval", str(interval),
           "--log-level", "warning"]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's log, read if it fails to start
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        for child in _children(server.pid):  # the ranks (and multiprocessing's helper)
            os.sched_setaffinity(child, others)
        cpu0, steps0 = _cpu_s(server.pid), _steps(port)
        with tempfile.TemporaryDirectory() as tmp:
            prompts = 2 * concurrency
            client = subprocess.Popen(
                [sys.executable, "-m", "eplb.cli", "bench", "serve", "--port", str(port),
                 "--random-input-len", "32", "--random-output-len", str(output_len),
                 "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                 "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", tmp,
                 "--result-filename", "r.json"], env=env, stdout=subprocess.DEVNULL,
                preexec_fn=lambda: os.sched_setaffinity(0, others))
            _, code, usage = os.wait4(client.pid, 0)
            client.returncode = os.waitstatus_to_exitcode(code)
            if client.returncode != 0:
                raise RuntimeError(f"eplb bench serve exited {client.returncode}")
            client_cpu = usage.ru_utime + usage.ru_stime
            with open(os.path.join(tmp, "r.json")) as f:
                result = json.load(f)
        cpu, steps = _cpu_s(server.pid) - cpu0, _steps(port) - steps0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    tokens = result["completed"] * output_len
    return {"setting": setting, "concurrency": concurrency, "streamed_tokens": tokens, "engine_steps": steps,
            "front_cpu_s": round(cpu, 2), "front_us_per_token": round(cpu / tokens * 1e6, 1),
            "front_ms_per_step": round(cpu / steps * 1e3, 2),
            "client_us_per_token": round(client_cpu / tokens * 1e6, 1),
            "output_tok_s": round(result["output_throughput"], 1), "median_itl_ms": round(result["median_itl_ms"], 2)}


def _parse_settings(text: str) -> list[str]:
    """'a,b, interval 4,c' -> ['a', 'b, interval 4', 'c']: a part that starts with a space
    continues the setting before it."""
    out: list[str] = []
    for part in text.split(","):
        if part.startswith(" ") and out:
            out[-1] += "," + part
        else:
            out.append(part.strip())
    unknown = [s for s in out if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; allowed: {list(SETTINGS)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="64,256")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "front.json"))
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help=f"comma-separated, the first is the baseline; of: {', '.join(SETTINGS)} "
                         "(a setting's own commas are kept: 'interval 4' follows its stack)")
    args = ap.parse_args()
    settings = _parse_settings(args.settings)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench/front.py needs at least 2 CPUs (the front gets one to itself)")
    others = set(cpus[1:])
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        for setting in settings:
            rows.append(run(setting, c, args.output_len, others, env))
        base = rows[-len(settings)]
        for r in rows[-len(settings):]:
            r["baseline_over_this"] = round(base["front_us_per_token"] / r["front_us_per_token"], 2)
    print(f"{'setting':<30}{'conc':>5}{'us/token':>10}{'ms/step':>9}{'vs base':>9}{'client us/tok':>14}"
          f"{'tok/s':>9}{'ITL ms':>8}")
    for r in rows:
        print(f"{r['setting']:<30}{r['concurrency']:>5}{r['front_us_per_token']:>10}{r['front_ms_per_step']:>9}"
              f"{r['baseline_over_this']:>9}{r['client_us_per_token']:>14}{r['output_tok_s']:>9}{r['median_itl_ms']:>8}")
    write_rows(args.out, "front process CPU (user+system, /proc) per streamed token and per engine step while "
               "`eplb bench serve` streams from `eplb serve` (shipped model, CPU); front pinned to CPU 0, ranks "
               "and the load client to the others; baseline = the first setting; client_us_per_token = the load "
               "client's CPU (user+system, start-up included) per token", vars(args), rows)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
