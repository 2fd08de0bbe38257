"""Runtime benchmark: forward-step time of 4 DP+EP ranks on CPU (gloo), steady and while EPLB
rebalances, sync against async.

Run: .venv/bin/python bench/runtime.py [--ranks 4] [--quick]
Writes bench/results/runtime.json and prints a table.

One group of spawned ranks runs three scenarios on the same requests (a random Qwen3-MoE with
experts big enough that moving them takes time: 8 layers, hidden 256, 16 experts, expert
intermediate 512, float32, 4 redundant slots):
- ``off``: EPLB off; every step is "steady" (the baseline, measured in the same run);
- ``sync``: EPLB sync every ``step_interval`` steps; the step whose boundary ran the rebalance
  carries the whole transfer;
- ``async``: EPLB async; steps that ran while a rebalance was in flight are "during async".
A step's time is one iteration of rank 0's loop that ran a forward: the per-step all-reduce,
any EPLB work at that boundary, and the forward (which waits for the slowest rank in its
collectives). Ratios compare against the steady steps of the ``off`` scenario.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from machine import cpu_model  # bench/machine.py (the script's folder is on sys.path)

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eplb.engine.sampling import SamplingParams  # noqa: E402
from eplb.model.tiny import make_tiny_checkpoint  # noqa: E402
from eplb.runtime.dp_offline import Scenario, run_scenarios  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(hidden_size=256, num_hidden_layers=8, num_experts=16, moe_intermediate_size=512,
             head_dim=32, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512)
ENGINE = {"dtype": "float32", "max_model_len": 320, "max_num_seqs": 8}


def requests(num: int, max_tokens: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 128, (8 + (i * 5) % 24,), generator=g).tolist(),
             SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            for i in range(num)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summarize(log: list[tuple[float, str]], phase: str) -> dict:
    ms = [s * 1e3 for s, p in log if p == phase]
    return {"steps": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "max_ms": max(ms) if ms else float("nan"),
            "mean_ms": statistics.mean(ms) if ms else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS / "runtime.json"))
    args = ap.parse_args()
    g = args.ranks
    max_tokens = 60 if args.quick else 240
    interval = 20 if args.quick else 40
    reqs = requests(4 * g, max_tokens)
    eplb = {"window_size": interval, "step_interval": interval, "num_redundant_experts": g,
            "policy": "deepseek"}
    scenarios = [
        Scenario("off", requests=reqs, record_steps=True),
        Scenario("sync", eplb={**eplb, "use_async": False}, requests=reqs, record_steps=True),
        Scenario("async", eplb={**eplb, "use_async": True}, requests=reqs, record_steps=True),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_checkpoint(tmp, "qwen3_moe", seed=0, tokenizer=True, **MODEL)
        res = run_scenarios(tmp, g, scenarios, ENGINE, timeout_s=1800)
    by = {sc.name: r for sc, r in zip(scenarios, res)}
    steady = summarize(by["off"][0]["step_log"], "steady")
    rows = {
        "steady (EPLB off)": steady,
        "steady (async run, between rebalances)": summarize(by["async"][0]["step_log"], "steady"),
        "during sync rebalance": summarize(by["sync"][0]["step_log"], "sync"),
        "during async rebalance": summarize(by["async"][0]["step_log"], "async"),
    }
    for row in rows.values():
        row["p50_vs_steady"] = row["p50_ms"] / steady["p50_ms"]
        row["p99_vs_steady"] = row["p99_ms"] / steady["p99_ms"]
    figures = {}
    for name in ("sync", "async"):
        st = by[name][0]["stats"]
        figures[name] = {k: st[k] for k in ("rebalances", "rebalances_failed", "copies_moved",
                                            "bytes_moved", "mean_rebalance_s", "steps")}
        figures[name]["steps_in_flight"] = [e["steps_in_flight"] for e in st["events"]]
    tokens_equal = all(
        {k: v for r in by[n] for k, v in r["tokens"].items()}
        == {k: v for r in by["off"] for k, v in r["tokens"].items()} for n in ("sync", "async"))
    async_ratio = rows["during async rebalance"]["p99_vs_steady"]
    result = {
        "benchmark": "runtime",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": sys.version.split()[0],
                    "load_avg_at_end": os.getloadavg()},
        "setup": {"ranks": g, "backend": "allgather_reducescatter", "model": MODEL,
                  "engine": ENGINE, "requests": len(reqs), "max_tokens": max_tokens,
                  "eplb": eplb, "threads_per_rank": 1},
        "step_time": rows,
        "rebalances": figures,
        "tokens_equal_across_scenarios": tokens_equal,
        "target": {"async_p99_within_1.25x_steady": async_ratio <= 1.25,
                   "async_p99_vs_steady": async_ratio},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{g} ranks, CPU ({cpu_model()}), torch {torch.__version__}")
    print(f"{'phase':42s} {'steps':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'p50 x':>6s} {'p99 x':>6s}")
    for name, row in rows.items():
        print(f"{name:42s} {row['steps']:6d} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
              f"{row['p50_vs_steady']:6.2f} {row['p99_vs_steady']:6.2f}")
    for name, f in figures.items():
        print(f"{name}: {f['rebalances']} rebalances, {f['copies_moved']} copies, "
              f"{f['bytes_moved'] / 2**20:.1f} MiB, mean {f['mean_rebalance_s'] * 1e3:.0f} ms, "
              f"steps in flight {f['steps_in_flight']}")
    print(f"tokens equal across scenarios: {tokens_equal}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
