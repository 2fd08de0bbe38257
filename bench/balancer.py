"""Balancer benchmark: `refined` (ours) against `deepseek` on model shapes, skews and drift.

Run: .venv/bin/python bench/balancer.py [--quick]
Writes bench/results/balancer.json and bench/results/balancer.md and prints the table.

Static cases: a window of W steps from a Zipf trace (no drift) is the fitting load; we report
balancedness on that load (and the bound no placement can beat) and on the next W steps, one by
one (held out: routing noise counts). Drift cases: `eplb.sim.simulate` replays a drifting trace
with a sudden change half-way, rebalancing every I steps from the last W steps; we report mean
balancedness over all steps and layers and the expert copies moved.
Policy time is CPU time of one thread (time.process_time, torch and numpy on one thread), so a
busy shared machine does not inflate it; wall time is reported beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.balancer.policies import get_policy  # noqa: E402
from eplb.balancer.stats import balancedness, balancedness_upper_bound  # noqa: E402
from eplb.sim.simulate import simulate  # noqa: E402
from eplb.sim.traces import SyntheticSpec, synthetic_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS_PER_RANK = 128  # tokens per EP rank and step (a decode batch); pairs = this * G * top_k
WINDOW = 50


def shapes(quick: bool) -> list[dict]:
    cases = []
    for g in (4, 8, 16):
        for r in (0, g, 2 * g):
            cases.append(dict(model="Qwen3-30B-A3B", L=48, E=128, G=g, R=r, N=1, K=1, top_k=8))
    for g, n in ((32, 4), (64, 8), (128, 8)):
        # R = 32 only divides evenly at EP 32 (288 slots); at EP 64/128 we take the smallest
        # R >= 32 that gives every rank the same slot count.
        r = next(r for r in range(32, 10_000) if (256 + r) % g == 0)
        cases.append(dict(model="DeepSeek-V3", L=58, E=256, G=g, R=r, N=n, K=8, top_k=8))
    for g in (2, 4, 8):
        for r in (0, g):
            cases.append(dict(model="Mixtral-8x7B", L=32, E=8, G=g, R=r, N=1, K=1, top_k=2))
    if quick:
        cases = [c for c in cases if c["G"] in (4, 64)]
    return cases


def tokens(c: dict) -> int:
    return TOKENS_PER_RANK * c["G"] * c["top_k"]


def timed(fn, *args, **kwargs):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.process_time() - c0) * 1000, (time.perf_counter() - w0) * 1000


def static_case(c: dict, skew: float, seed: int) -> dict:
    spec = SyntheticSpec(steps=2 * WINDOW, layers=c["L"], experts=c["E"], tokens=tokens(c), skew=skew,
                         drift=0.0, shift_at=-1, seed=seed)
    trace = torch.from_numpy(synthetic_trace(spec))
    fit, held = trace[:WINDOW].sum(0), trace[WINDOW:]
    row = {"bound": float(balancedness_upper_bound(fit, c["G"], c["R"]).mean())}
    variants = [("deepseek", c["N"], c["K"]), ("refined", c["N"], c["K"])]
    if c["N"] > 1:
        variants.append(("deepseek_global", 1, 1))
    for label, n, k in variants:
        name = "deepseek" if label.startswith("deepseek") else label
        p, cpu_ms, _ = timed(get_policy(name), fit, c["G"], c["R"], num_nodes=n, num_groups=k)
        row[label] = {
            "fit": float(balancedness(fit, p).mean()),
            "held_out": float(balancedness(held, p).mean()),
            "colocated": int(p.num_colocated().sum()),
            "cpu_ms": cpu_ms,
        }
    return row


def drift_case(c: dict, seed: int, steps: int) -> dict:
    spec = SyntheticSpec(steps=steps, layers=c["L"], experts=c["E"], tokens=tokens(c), skew=1.0,
                         drift=0.02, shift_at=steps // 2, seed=seed)
    trace = synthetic_trace(spec)
    row = {"max_moves_capped": capped_moves(c)}
    for label, name, cap in (("deepseek", "deepseek", None), ("refined", "refined", None),
                             ("refined_capped", "refined", capped_moves(c))):
        r = simulate(trace, name, c["G"], c["R"], window_size=100, step_interval=100,
                     num_nodes=c["N"], num_groups=c["K"], max_moves=cap)
        row[label] = r.summary()
    return row


def capped_moves(c: dict) -> int:
    """The per-layer cap of the `refined_capped` variant: 1/16 of the slots."""
    return max(2, (c["E"] + c["R"]) // 16)


def timing_case(repeats: int) -> dict:
    """refined at DeepSeek-V3 shape, EP 64: fresh, and warm from the previous placement."""
    L, E, G, R = 58, 256, 64, 64
    spec = SyntheticSpec(steps=200, layers=L, experts=E, tokens=TOKENS_PER_RANK * G * 8, skew=1.0, drift=0.02,
                         shift_at=-1, seed=7)
    trace = torch.from_numpy(synthetic_trace(spec))
    a, b = trace[:100].sum(0), trace[100:].sum(0)
    out = {}
    for name in ("deepseek", "refined"):
        pol = get_policy(name)
        fresh = [timed(pol, a, G, R, num_nodes=8, num_groups=8) for _ in range(repeats)]
        prev = fresh[0][0]
        warm = [timed(pol, b, G, R, num_nodes=8, num_groups=8, previous=prev) for _ in range(repeats)]
        out[name] = {
            "fresh_cpu_ms": statistics.median(x[1] for x in fresh),
            "fresh_wall_ms": statistics.median(x[2] for x in fresh),
            "warm_cpu_ms": statistics.median(x[1] for x in warm),
            "warm_wall_ms": statistics.median(x[2] for x in warm),
            "warm_moved": int(warm[0][0].moved_slots(prev).sum()),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    ap.add_argument("--drift-steps", type=int, default=600)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_avg = os.getloadavg()
    t_start = time.perf_counter()
    cases = []
    for i, c in enumerate(shapes(args.quick)):
        label = f"{c['model']} EP{c['G']} R={c['R']}" + (f" N={c['N']} K={c['K']}" if c["N"] > 1 else "")
        for skew in (0.5, 1.0, 1.5):
            cases.append({**c, "case": label, "trace": f"zipf {skew}", **static_case(c, skew, seed=i)})
        cases.append({**c, "case": label, "trace": "drift", **drift_case(c, i, args.drift_steps)})
        print(f"done {label}", file=sys.stderr, flush=True)
    timing = timing_case(repeats=3 if args.quick else 5)

    static = [x for x in cases if x["trace"] != "drift"]
    drift = [x for x in cases if x["trace"] == "drift"]
    ge = [x["refined"]["fit"] >= x["deepseek"]["fit"] - 1e-9 for x in static]
    gaps = [(x["bound"] - x["deepseek"]["fit"], x["bound"] - x["refined"]["fit"]) for x in static]
    open_gaps = [(d, r) for d, r in gaps if d > 1e-6]
    closure_mean = float(np.mean([1 - r / d for d, r in open_gaps])) if open_gaps else 1.0
    closure_total = 1 - sum(r for _, r in open_gaps) / sum(d for d, _ in open_gaps) if open_gaps else 1.0
    moves_ds = sum(x["deepseek"]["copies_moved"] for x in drift)
    moves_ours = sum(x["refined"]["copies_moved"] for x in drift)
    drift_ok = [
        x["refined"]["copies_moved"] <= 0.5 * x["deepseek"]["copies_moved"]
        and x["refined"]["mean_balancedness"] >= x["deepseek"]["mean_balancedness"] - 1e-9
        for x in drift if x["deepseek"]["copies_moved"] > 0
    ]
    bal_ds = float(np.mean([x["deepseek"]["mean_balancedness"] for x in drift]))
    bal_ours = float(np.mean([x["refined"]["mean_balancedness"] for x in drift]))
    bal_capped = float(np.mean([x["refined_capped"]["mean_balancedness"] for x in drift]))
    moves_capped = sum(x["refined_capped"]["copies_moved"] for x in drift)
    targets = {
        "refined_fit_ge_deepseek_cases": f"{sum(ge)}/{len(ge)}",
        "gap_to_bound_closed_mean": closure_mean,
        "gap_to_bound_closed_total": closure_total,
        "drift_moves_ratio_total": moves_ours / max(moves_ds, 1),
        "drift_mean_balancedness_deepseek": bal_ds,
        "drift_mean_balancedness_refined": bal_ours,
        "drift_moves_ratio_total_capped": moves_capped / max(moves_ds, 1),
        "drift_mean_balancedness_refined_capped": bal_capped,
        "drift_cases_half_moves_at_equal_or_better_balancedness": f"{sum(drift_ok)}/{len(drift_ok)}",
        "refined_ds_v3_ep64_cpu_ms_fresh": timing["refined"]["fresh_cpu_ms"],
        "refined_ds_v3_ep64_cpu_ms_warm": timing["refined"]["warm_cpu_ms"],
    }
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_start": load_avg,
                    "torch": torch.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "threads": 1},
        "settings": {"tokens_per_rank_step": TOKENS_PER_RANK, "static_window": WINDOW,
                     "drift": {"steps": args.drift_steps, "window": 100, "interval": 100, "skew": 1.0,
                               "drift": 0.02, "shift_at": args.drift_steps // 2}},
        "targets": targets,
        "timing_ds_v3_ep64": timing,
        "cases": cases,
        "runtime_s": time.perf_counter() - t_start,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "balancer.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    (RESULTS / "balancer.md").write_text(md)
    print(md)
    return 0


def render_markdown(res: dict) -> str:
    m, t = res["machine"], res["targets"]
    lines = [
        "# Balancer benchmark",
        "",
        f"{res['date']} · {m['cpu']} ({m['cores']} cores, load average at start "
        f"{m['load_average_at_start'][0]:.1f}) · torch {m['torch']} · one thread",
        "",
        "Balancedness = mean rank load / max rank load (1 = perfect), mean over layers. "
        "`fit`: on the window the policy saw; `held`: on the next steps, one at a time. "
        "`bound`: the best any placement could reach on the fit load.",
        "",
        "| case | trace | bound | deepseek fit | refined fit | deepseek held | refined held | "
        "ds colocated | ours colocated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in res["cases"]:
        if x["trace"] == "drift":
            continue
        d, r = x["deepseek"], x["refined"]
        extra = ""
        if "deepseek_global" in x:
            extra = f" (global ds {x['deepseek_global']['fit']:.4f})"
        lines.append(
            f"| {x['case']} | {x['trace']} | {x['bound']:.4f} | {d['fit']:.4f}{extra} | "
            f"{r['fit']:.4f} | {d['held_out']:.4f} | {r['held_out']:.4f} | {d['colocated']} | "
            f"{r['colocated']} |")
    lines += [
        "",
        "Drifting trace (skew 1.0, drift 0.02/step, sudden change half-way; window 100, "
        "rebalance every 100 steps):",
        "",
        "`capped`: refined with `max_moves` = 1/16 of the slots per layer and rebalance.",
        "",
        "| case | deepseek mean | refined mean | deepseek p5 | refined p5 | deepseek moved | "
        "refined moved | ratio | capped mean | capped moved | refined ms (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in res["cases"]:
        if x["trace"] != "drift":
            continue
        d, r = x["deepseek"], x["refined"]
        ratio = r["copies_moved"] / d["copies_moved"] if d["copies_moved"] else float("nan")
        lines.append(
            f"| {x['case']} | {d['mean_balancedness']:.4f} | {r['mean_balancedness']:.4f} | "
            f"{d['p5_balancedness']:.4f} | {r['p5_balancedness']:.4f} | {d['copies_moved']} | "
            f"{r['copies_moved']} | {ratio:.2f} | {x['refined_capped']['mean_balancedness']:.4f} | "
            f"{x['refined_capped']['copies_moved']} | {r['mean_policy_ms']:.0f} |")
    tm = res["timing_ds_v3_ep64"]
    lines += [
        "",
        "Policy time, DeepSeek-V3 shape (58 x 256, EP 64, R 64), median, one thread:",
        "",
        "| policy | fresh CPU ms | fresh wall ms | warm CPU ms | warm wall ms | warm moved |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in tm.items():
        lines.append(f"| {name} | {v['fresh_cpu_ms']:.0f} | {v['fresh_wall_ms']:.0f} | "
                     f"{v['warm_cpu_ms']:.0f} | {v['warm_wall_ms']:.0f} | {v['warm_moved']} |")
    lines += ["", "Targets:", ""]
    for k, v in t.items():
        lines.append(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
