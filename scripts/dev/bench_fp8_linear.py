"""Dev bench (GPU): block-FP8 dense linear (eplb.kernels.fp8_linear) at Qwen3-30B-A3B's attention
projection shapes (qkv: N=5120, K=2048; o: N=2048, K=4096) vs bf16 F.linear on the dequantized
weight. Not a test; prints a small report.

Times are ms per call: "graph" replays a CUDA graph of REPS calls (what decode runs), "eager"
times REPS back-to-back calls (includes Python/launch overhead); both are medians of 10 repeats
after warm-up, measured with CUDA events. Also the max rel. error vs the float32 emulation.

  python scripts/dev/bench_fp8_linear.py            # table for M in 1, 32, 128, 1024, 8192
  python scripts/dev/bench_fp8_linear.py --sweep    # + split-K configs at small M (compiled in
                                                    #   parallel processes first), best 5 each
  PYTEST=1 ...                                      # also runs the fp8 linear tests meanwhile
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "src"))
from eplb.kernels import linear_fp8, quant_dequant_act, quantize_block_fp8  # noqa: E402
from eplb.model.checkpoint import dequantize_block_fp8  # noqa: E402

SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096)}
TABLE_M = [1, 32, 128, 1024, 8192]
SWEEP_M = [1, 16, 32, 64, 128, 256]
REPS = 20
T0 = time.time()


def weights(n: int, k: int, dev: str = "cuda"):
    g = torch.Generator().manual_seed(n + k)
    q, s = quantize_block_fp8(torch.randn(n, k, generator=g) / k**0.5)
    d = dequantize_block_fp8(q, s, [128, 128])
    return q.to(dev), s.to(dev), d.to(torch.bfloat16).to(dev), d


def graph_ms(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / REPS)
    del g
    return statistics.median(ts)


def eager_ms(fn) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(REPS):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / REPS)
    return statistics.median(ts)


def sweep_configs(m: int, kb: int):
    # BM=64 only: below 64 rows the e4m3 dot becomes fp16 mma.sync (first sweep: always slower)
    for bn, pre_q, reduce in itertools.product([32, 64, 128], [False, True], [0, 1, 2]):
        for kb_per in ([kb] if reduce == 0 else [1, 2, 4, 8, 16]):
            if reduce and kb_per >= kb:
                continue
            for stages in ([3, 4] if reduce == 0 else [3]):
                yield {"BM": 64, "BN": bn, "kb_per": kb_per, "PRE_Q": pre_q, "REDUCE": reduce,
                       "num_warps": 4, "num_stages": stages}


def sweep_jobs():
    return [(name, m, cfg) for name, (n, k) in SHAPES.items() for m in SWEEP_M
            for cfg in sweep_configs(m, k // 128)]


def _compile_worker(jobs) -> int:
    """Runs each job once so triton's on-disk cache holds every kernel variant."""
    ws = {name: weights(n, k)[:2] for name, (n, k) in SHAPES.items()}
    for name, m, cfg in jobs:
        n, k = SHAPES[name]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        linear_fp8._fp8_linear_splitk(x, *ws[name], y, cfg)
    torch.cuda.synchronize()
    return len(jobs)


def table() -> None:
    print(f"\n## table (ms per call; H100; bf16 = F.linear on the dequantized weight)   t={time.time() - T0:.0f}s")
    print("| shape | M | fp8 graph | bf16 graph | old fp8 graph | fp8 eager | bf16 eager | old fp8 eager "
          "| rel err vs emu | path |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        q, s, db, d32 = weights(n, k)
        for m in TABLE_M:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = linear_fp8.fp8_linear(x, q, s)
            if m <= 1024:
                emu = quant_dequant_act(x.float().cpu()) @ d32.T
                err = f"{((y.cpu().double() - emu.double()).norm() / emu.double().norm()).item():.2e}"
            else:
                err = "-"
            cfg = linear_fp8._small_config(m, n, k)
            fp8 = lambda: linear_fp8.fp8_linear(x, q, s)  # noqa: E731
            bf = lambda: F.linear(x, db)  # noqa: E731
            row = [graph_ms(fp8), graph_ms(bf)]
            old_max = linear_fp8.SMALL_M_MAX
            linear_fp8.SMALL_M_MAX = 0
            try:
                old = graph_ms(fp8) if cfg is not None else float("nan")
                old_e = eager_ms(fp8) if cfg is not None else float("nan")
            finally:
                linear_fp8.SMALL_M_MAX = old_max
            print(f"| {name} N={n} K={k} | {m} | {row[0]:.4f} | {row[1]:.4f} | {old:.4f} | "
                  f"{eager_ms(fp8):.4f} | {eager_ms(bf):.4f} | {old_e:.4f} | {err} | "
                  f"{cfg if cfg else 'large-M'} |", flush=True)
            torch.cuda.empty_cache()


def sweep(budget_s: float) -> None:
    print(f"\n## sweep (graph ms per call, best 6 per shape/M)   t={time.time() - T0:.0f}s")
    for name, (n, k) in SHAPES.items():
        q, s, _, _ = weights(n, k)
        for m in SWEEP_M:
            if time.time() - T0 > budget_s:
                print("sweep stopped: time budget")
                return
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            res = []
            for cfg in sweep_configs(m, k // 128):
                t = graph_ms(lambda: linear_fp8._fp8_linear_splitk(x, q, s, y, cfg))  # noqa: B023
                res.append((t, cfg))
            res.sort(key=lambda r: r[0])
            dflt = linear_fp8._small_config(m, n, k)
            td = graph_ms(lambda: linear_fp8.fp8_linear(x, q, s))  # noqa: B023
            print(f"{name} M={m}: default {td:.4f} ({dflt})")
            for t, cfg in res[:6]:
                print(f"    {t:.4f}  {cfg}")
            best_no_fuse = min((r for r in res if r[1]["REDUCE"] != 2), key=lambda r: r[0])
            print(f"    best without fused reduce: {best_no_fuse[0]:.4f} {best_no_fuse[1]}", flush=True)


def main() -> None:
    do_sweep = "--sweep" in sys.argv
    tests = None
    if os.environ.get("PYTEST") == "1":
        tests = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels_linear_fp8.py",
             "tests/test_kernels_moe.py", "-k", "linear or splitk or small_path"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if do_sweep:
        jobs = sweep_jobs()
        chunks = [jobs[i::12] for i in range(12)]
        with mp.get_context("spawn").Pool(12) as pool:
            done = sum(pool.map(_compile_worker, chunks))
        print(f"compiled {done} sweep jobs in {time.time() - T0:.0f}s", flush=True)
    if tests is not None:
        out, _ = tests.communicate()
        print(f"## pytest (t={time.time() - T0:.0f}s)\n" + out[-3000:], flush=True)
    table()
    if do_sweep:
        sweep(budget_s=float(os.environ.get("BUDGET_S", "130")))
    print(f"done t={time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
