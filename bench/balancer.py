"""Balancer benchmark: every policy judged on the traffic it has not seen yet.

Run: PYTHONPATH=src .venv/bin/python bench/balancer.py [--quick] [--trace T.npz ...]
Writes bench/results/balancer.json, bench/results/balancer.md and docs/balancer-shift.png.

1. Next-interval balance. For each model shape (Qwen3-30B-A3B EP 4/8/32, DeepSeek-V3 EP 32/64,
   Mixtral-8x7B EP 4/8; R = 0, G, 2G) and trace (stationary, drifting, shift, bursty; Zipf 1.0,
   128 decode tokens per rank and step) the server is replayed step by step
   (``eplb.sim.simulate.replay``): fit on the window, serve the next interval, score every step
   of it. Variants: ``deepseek`` (DeepSeek's greedy, global mode: the policy vLLM and SGLang
   ship), ``refined`` (the server's default: our policy, window estimator, interval trigger,
   the window's steps passed as ``history``),
   ``refined+ewma``, ``refined+shift`` (the window estimator and the shift trigger), and ``hindsight``
   (refined fit on each interval's own traffic, and on shift traces on the steps from the
   shift on: an oracle). Scored steps: every step after the
   first rebalance. Standard errors of the paired per-step difference to ``deepseek`` come from
   means of blocks of ``BLOCK`` steps (steps are correlated). Layers are independent, so the
   traces have ``LAYERS`` layers, not the model's. Recorded traces (``bench/traces/*.npz``,
   written by ``eplb serve --record-trace``) run the same way at EP 2 and 4.
2. Shift recovery: on the shift traces, steps after the shift until the 5-step mean of
   ``refined+shift`` is within 2 points of hindsight fit on the steps after the shift.
3. Load-aware replica dispatch against the static split at decode-size steps (32-256 tokens per
   rank): every DP rank splits its own pairs (``eplb.balancer.dispatch``), ranks' loads summed.
4. Policy time at DeepSeek-V3's full shape (58 x 256, EP 64, R 64), CPU time of one thread
   (fresh; warm from the previous placement; warm with 100 steps of history), and the toy
   (600, 560, 120, 120, 20, 10, 10, 10 on 8 ranks, 8 redundant slots).
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

from eplb.balancer.dispatch import static_slots, water_fill_slots  # noqa: E402
from eplb.balancer.policies import get_policy  # noqa: E402
from eplb.balancer.stats import balancedness, rank_loads  # noqa: E402
from eplb.config import EPLBConfig  # noqa: E402
from eplb.sim.simulate import hindsight, replay  # noqa: E402
from eplb.sim.traces import SyntheticSpec, load_trace, synthetic_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "balancer-shift.png"
TRACES = ROOT / "bench" / "traces"  # recorded by eplb serve --record-trace; all run by default
TOKENS_PER_RANK = 128  # decode tokens per EP rank and step
LAYERS = 4
WINDOW = INTERVAL = 100
BLOCK = 10  # steps per block for standard errors
HALF_LIFE = 25.0
TOY = [600, 560, 120, 120, 20, 10, 10, 10]


def shapes(quick: bool) -> list[dict]:
    out = []
    for model, E, k, ranks in (("Qwen3-30B-A3B", 128, 8, (4, 8, 32)), ("DeepSeek-V3", 256, 8, (32, 64)),
                               ("Mixtral-8x7B", 8, 2, (4, 8))):
        for G in ranks:
            for R in (0, G, 2 * G):
                out.append(dict(model=model, E=E, k=k, G=G, R=R))
    if quick:
        out = [c for c in out if (c["model"], c["G"], c["R"]) in
               (("Qwen3-30B-A3B", 8, 8), ("DeepSeek-V3", 32, 32), ("Mixtral-8x7B", 4, 4))]
    return out


def shift_step(steps: int) -> int:
    """Half-way, in the middle of an interval (a shift at a rebalance would hide the trigger)."""
    return (steps // 2 // INTERVAL) * INTERVAL + INTERVAL // 2


def trace_kinds(steps: int) -> dict[str, dict]:
    return {
        "stationary": dict(drift=0.0, shift_at=-1),
        "drifting": dict(drift=0.02, shift_at=-1),
        "shift": dict(drift=0.0, shift_at=shift_step(steps)),
        "bursty": dict(drift=0.0, shift_at=-1, burst_every=50, burst_len=10),
    }


def variants(R: int) -> dict[str, EPLBConfig]:
    base = dict(window_size=WINDOW, step_interval=INTERVAL, num_redundant_experts=R)
    return {
        "deepseek": EPLBConfig(**base, policy="deepseek"),
        "refined": EPLBConfig(**base),
        "refined+ewma": EPLBConfig(**base, load_estimator="ewma", load_half_life=HALF_LIFE),
        "refined+shift": EPLBConfig(**base, rebalance_trigger="shift"),
    }


def paired(ours: np.ndarray, ref: np.ndarray, block: int = BLOCK) -> tuple[float, float]:
    """Mean and standard error (means of blocks of ``block`` steps) of ``ours - ref``."""
    d = ours - ref
    n = len(d) // block
    blocks = d[: n * block].reshape(n, block).mean(1)
    return float(d.mean()), float(blocks.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def run_case(trace: np.ndarray, G: int, R: int, shift_at: int) -> dict:
    per_step = {}
    row = {"variants": {}}
    for name, cfg in variants(R).items():
        r = replay(trace, cfg, G, label=name)
        per_step[name] = r.balancedness.mean(1)
        row["variants"][name] = {
            "copies_moved": r.copies_moved, "rebalances": r.rebalances,
            "early_rebalances": sum(1 for _, why in r.events if why != "interval"),
        }
    cuts = (shift_at,) if shift_at > 0 else ()
    per_step["hindsight"] = hindsight(trace, "refined", G, R, step_interval=INTERVAL,
                                      extra_cuts=cuts).mean(1)
    scored = slice(INTERVAL, None)  # every policy serves the default placement before that
    for name, b in per_step.items():
        v = row["variants"].setdefault(name, {})
        v["mean"] = float(b[scored].mean())
        v["worst"] = float(b[scored].min())
        if name != "deepseek":
            v["diff"], v["se"] = paired(b[scored], per_step["deepseek"][scored])
    if shift_at > 0:
        row["recovery_steps"] = recovery(per_step["refined+shift"], per_step["hindsight"], shift_at)
        row["per_step"] = {k: v.tolist() for k, v in per_step.items()}
    return row


def recovery(b: np.ndarray, best: np.ndarray, shift_at: int) -> int | None:
    """Steps after the shift until the 5-step mean of ``b`` is within 2 points of hindsight's
    (fit on the steps from the shift to the next interval boundary); None: not before then."""
    end = (shift_at // INTERVAL + 1) * INTERVAL
    for s in range(0, end - shift_at - 5):
        if b[shift_at + s: shift_at + s + 5].mean() >= best[shift_at + s: shift_at + s + 5].mean() - 0.02:
            return s
    return None


def dispatch_case(model: str, E: int, k: int, G: int, R: int, tokens: int, steps: int, seed: int) -> dict:
    """Per-step balancedness with the static split and with load-aware dispatch."""
    spec = SyntheticSpec(steps=WINDOW, layers=2, experts=E, tokens=TOKENS_PER_RANK * G * k,
                         skew=1.0, drift=0.0, shift_at=-1, seed=seed)
    trace = synthetic_trace(spec)
    p = get_policy("refined")(torch.from_numpy(trace.sum(0)), G, R)
    g = torch.Generator().manual_seed(seed)
    fit = torch.from_numpy(trace.sum(0)).double()
    out = {"static": [], "load_aware": []}
    S = p.slots_per_rank
    for step in range(steps):
        for layer in range(p.num_layers):
            # each token picks k distinct experts with the layer's popularity
            ids = torch.multinomial(fit[layer].expand(G * tokens, E), k, generator=g).view(G, -1)
            l2p, cnt = p.log2phy[layer], p.replica_count[layer]
            loads = {m: torch.zeros(G) for m in out}
            for rank in range(G):
                s_static = static_slots(ids[rank], l2p, cnt, step * G + rank)
                s_aware = water_fill_slots(ids[rank], l2p, cnt, S, G)
                loads["static"] += torch.bincount(s_static // S, minlength=G)
                loads["load_aware"] += torch.bincount(s_aware // S, minlength=G)
            for m, x in loads.items():
                out[m].append(float(x.mean() / x.max()))
    res = {m: float(np.mean(v)) for m, v in out.items()}
    # steps are independent draws here: no blocks needed
    res["diff"], res["se"] = paired(np.array(out["load_aware"]), np.array(out["static"]), block=1)
    return {"case": f"{model} EP{G} R={R}", "tokens_per_rank": tokens, **res}


def timing(repeats: int) -> dict:
    L, E, G, R = 58, 256, 64, 64
    out = {}
    for skew in (1.0, 1.5):
        spec = SyntheticSpec(steps=200, layers=L, experts=E, tokens=TOKENS_PER_RANK * G * 8, skew=skew,
                             drift=0.02, shift_at=-1, seed=7)
        trace = torch.from_numpy(synthetic_trace(spec))
        a, b = trace[:100].sum(0), trace[100:].sum(0)
        for name in ("deepseek", "refined"):
            pol = get_policy(name)

            def cpu_ms(*args, **kw):
                c0 = time.process_time()
                res = pol(*args, **kw)
                return res, (time.process_time() - c0) * 1000

            fresh = [cpu_ms(a, G, R) for _ in range(repeats)]
            warm = [cpu_ms(b, G, R, previous=fresh[0][0]) for _ in range(repeats)]
            # as the server calls it: with the window's steps as history
            hist = [cpu_ms(b, G, R, previous=fresh[0][0], history=trace[100:]) for _ in range(repeats)]
            out[f"{name} zipf {skew}"] = {
                "fresh_cpu_ms": statistics.median(x[1] for x in fresh),
                "warm_cpu_ms": statistics.median(x[1] for x in warm),
                "warm_history_cpu_ms": statistics.median(x[1] for x in hist),
                "fit_balancedness": float(balancedness(a, fresh[0][0]).mean()),
            }
    return out


def toy() -> dict:
    load = torch.tensor([TOY])
    return {name: {"max_rank_load": float(rank_loads(load, p).max()), "replica_count": p.replica_count[0].tolist()}
            for name in ("deepseek", "refined") for p in [get_policy(name)(load, 8, 8)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three shapes, shorter traces (development)")
    ap.add_argument("--steps", type=int, default=None, help="steps per trace (default 500, quick 300)")
    ap.add_argument("--trace", action="append", default=[],
                    help="a recorded trace (.npz from eplb serve --record-trace); repeatable; "
                         "default: every bench/traces/*.npz")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="added to every synthetic trace's seed (0: the published run; another "
                         "value checks that a result is not the seeds')")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = args.steps or (300 if args.quick else 500)
    load_avg = os.getloadavg()
    t_start = time.perf_counter()
    cases = []
    for i, c in enumerate(shapes(args.quick)):
        for kind, kw in trace_kinds(steps).items():
            spec = SyntheticSpec(steps=steps, layers=LAYERS, experts=c["E"], skew=1.0,
                                 tokens=TOKENS_PER_RANK * c["G"] * c["k"],
                                 seed=100 * i + len(cases) + args.seed_offset, **kw)
            row = run_case(synthetic_trace(spec), c["G"], c["R"], kw["shift_at"])
            cases.append({"case": f"{c['model']} EP{c['G']} R={c['R']}", "trace": kind, **row})
        print(f"done {c['model']} EP{c['G']} R={c['R']} ({time.perf_counter() - t_start:.0f} s)",
              file=sys.stderr, flush=True)
    for path in args.trace or sorted(str(x) for x in TRACES.glob("*.npz")):
        trace = load_trace(path)
        E = trace.shape[2]
        for G in (2, 4):
            for R in (0, G):
                if (E + R) % G == 0 and trace.shape[0] > 2 * INTERVAL:
                    row = run_case(trace, G, R, -1)
                    cases.append({"case": f"recorded {Path(path).name} EP{G} R={R}", "trace": "recorded", **row})
    disp_shapes = [("Qwen3-30B-A3B", 128, 8, 8, 8), ("DeepSeek-V3", 256, 8, 32, 32), ("Mixtral-8x7B", 8, 2, 4, 4)]
    dispatch = [dispatch_case(*s, tokens=t, steps=4 if args.quick else 10, seed=j)
                for j, s in enumerate(disp_shapes) for t in ((64, 256) if args.quick else (32, 64, 128, 256))]
    print(f"done dispatch ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
    tm = timing(repeats=2 if args.quick else 5)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_start": load_avg,
                    "torch": torch.__version__, "numpy": np.__version__,
                    "python": platform.python_version(), "threads": 1},
        "settings": {"steps": steps, "layers": LAYERS, "window": WINDOW, "interval": INTERVAL,
                     "tokens_per_rank_step": TOKENS_PER_RANK, "skew": 1.0, "block": BLOCK,
                     "ewma_half_life": HALF_LIFE, "quick": args.quick, "seed_offset": args.seed_offset},
        "cases": cases, "dispatch": dispatch, "timing_ds_v3_ep64": tm, "toy": toy(),
    }
    result["targets"] = targets(result)
    result["runtime_s"] = time.perf_counter() - t_start
    md = render(result)
    print(md)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        slim = {**result, "cases": [{k: v for k, v in c.items() if k != "per_step"} for c in cases]}
        (RESULTS / "balancer.json").write_text(json.dumps(slim, indent=1))
        (RESULTS / "balancer.md").write_text(md)
        plot(result)
    return 0


def targets(res: dict) -> dict:
    cases = res["cases"]
    v = [c["variants"] for c in cases]
    worse = [c["case"] + " " + c["trace"] for c in cases
             if c["variants"]["refined"]["diff"] < -2 * c["variants"]["refined"]["se"]]
    moved_ds = sum(x["deepseek"]["copies_moved"] for x in v)
    rec = [c["recovery_steps"] for c in cases if "recovery_steps" in c]
    tm = res["timing_ds_v3_ep64"]
    return {
        "refined_worse_than_deepseek_by_2se": worse,
        "refined_suite_mean_gain_points": 100 * float(np.mean([x["refined"]["diff"] for x in v])),
        "refined_copies_moved_ratio": sum(x["refined"]["copies_moved"] for x in v) / max(moved_ds, 1),
        "shift_recovery_steps": rec,
        "shift_recovery_within_20_steps": f"{sum(r is not None and r <= 20 for r in rec)}/{len(rec)}",
        "toy_refined_max_rank_load": res["toy"]["refined"]["max_rank_load"],
        "ds_v3_ep64_refined_fresh_cpu_ms": tm["refined zipf 1.0"]["fresh_cpu_ms"],
        "dispatch_mean_gain_points": 100 * float(np.mean([d["diff"] for d in res["dispatch"]])),
    }


def render(res: dict) -> str:
    m, t = res["machine"], res["targets"]
    names = ["deepseek", "refined", "refined+ewma", "refined+shift", "hindsight"]
    lines = [
        "# Balancer benchmark", "",
        f"{res['date']} · {m['cpu']} ({m['cores']} cores, load average at start "
        f"{m['load_average_at_start'][0]:.1f}) · torch {m['torch']} · one thread · "
        f"{res['runtime_s']:.0f} s", "",
        f"Per-step balancedness (mean rank load / max rank load, mean over {res['settings']['layers']} "
        f"layers) on the steps after the first rebalance, window {WINDOW}, rebalance every {INTERVAL} "
        f"steps, {TOKENS_PER_RANK} decode tokens per rank and step. `mean`/`worst`: over steps; "
        "`diff`: paired mean difference to deepseek, +- 2 standard errors (block means); "
        "`moved`: expert copies moved in the run.", "",
        "| case | trace | " + " | ".join(f"{n} mean" for n in names) + " | refined diff | refined worst | "
        "deepseek worst | deepseek moved | refined moved | shift recovery |",
        "|---|---|" + "---|" * (len(names) + 6),
    ]
    for c in res["cases"]:
        v = c["variants"]
        r = v["refined"]
        rec = "" if "recovery_steps" not in c else (
            "never" if c["recovery_steps"] is None else c["recovery_steps"])
        lines.append(
            f"| {c['case']} | {c['trace']} | " + " | ".join(f"{v[n]['mean']:.4f}" for n in names)
            + f" | {100 * r['diff']:+.2f} +- {200 * r['se']:.2f} | {r['worst']:.3f} | "
            f"{v['deepseek']['worst']:.3f} | {v['deepseek']['copies_moved']} | {r['copies_moved']} | {rec} |")
    lines += ["", "Load-aware replica dispatch vs the static split (refined placement, 2 layers, "
              "per-step balancedness):", "",
              "| case | tokens per rank | static | load-aware | diff (points) |", "|---|---|---|---|---|"]
    for d in res["dispatch"]:
        lines.append(f"| {d['case']} | {d['tokens_per_rank']} | {d['static']:.4f} | {d['load_aware']:.4f} | "
                     f"{100 * d['diff']:+.2f} +- {200 * d['se']:.2f} |")
    lines += ["", "Policy time, DeepSeek-V3 shape (58 x 256, EP 64, R 64), CPU ms of one thread (median):", "",
              "| policy | load | fresh | warm | warm + 100 steps of history | fit balancedness |",
              "|---|---|---|---|---|---|"]
    for k, x in res["timing_ds_v3_ep64"].items():
        name, load = k.split(" ", 1)
        lines.append(f"| {name} | {load} | {x['fresh_cpu_ms']:.0f} | {x['warm_cpu_ms']:.0f} | "
                     f"{x['warm_history_cpu_ms']:.0f} | {x['fit_balancedness']:.4f} |")
    toy_ = res["toy"]
    lines += ["", f"Toy (loads {TOY}, 8 ranks, 8 redundant): max rank load deepseek "
              f"{toy_['deepseek']['max_rank_load']:.1f} (counts {toy_['deepseek']['replica_count']}), refined "
              f"{toy_['refined']['max_rank_load']:.1f} (counts {toy_['refined']['replica_count']}).", "",
              "Targets:", ""]
    for k, x in t.items():
        lines.append(f"- {k}: {x:.3f}" if isinstance(x, float) else f"- {k}: {x}")
    return "\n".join(lines) + "\n"


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shift = [c for c in res["cases"] if c["trace"] == "shift" and "per_step" in c]
    if not shift:
        return
    c = next((x for x in shift if x["case"].startswith("DeepSeek-V3 EP32 R=32")), shift[0])
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, style in (("deepseek", "-"), ("refined", "-"), ("refined+shift", "-"), ("hindsight", ":")):
        ax.plot(c["per_step"][name], style, label=name, linewidth=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"balancedness (mean over {LAYERS} layers)")
    ax.set_title(f"{c['case']}: load shift at step {shift_step(res['settings']['steps'])}, "
                 f"rebalance every {INTERVAL} steps")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
