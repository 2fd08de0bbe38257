"""``eplb simulate``: replay a load trace through one or more policies and compare them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from eplb.balancer.placement import check_shape
from eplb.balancer.policies import get_policy
from eplb.cli_common import add_layout_arguments, fail, one_line_errors
from eplb.config import EPLBConfig
from eplb.sim.simulate import replay, step_bound
from eplb.sim.traces import load_trace, parse_spec, spec_dict, synthetic_trace

PROG = "eplb simulate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser, PROG)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace .npz holding load [steps, layers, experts]")
    src.add_argument("--synthetic", metavar="SPEC",
                     help="'default' or key=value,... (steps, layers, experts, tokens, skew, "
                          "drift, shift_at, seed)")
    add_layout_arguments(parser)
    parser.add_argument("--policy", default="deepseek,refined", help="comma-separated policy names")
    parser.add_argument("--window-size", type=int, default=1000)
    parser.add_argument("--step-interval", type=int, default=3000)
    parser.add_argument("--eplb-config", default=None, metavar="JSON",
                        help="more EPLB keys as for eplb serve (e.g. rebalance_trigger, "
                             "load_estimator, skip_gain_threshold); the flags above win")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--plot", default=None, help="write a PNG of balancedness over steps")


def main(args: argparse.Namespace) -> int:
    # Policies run many small tensor ops: extra threads only add overhead (and contend).
    torch.set_num_threads(1)
    names = [n.strip() for n in args.policy.split(",") if n.strip()]
    if not names:
        return fail(PROG, "--policy: give at least one policy name")
    for name in names:
        try:
            get_policy(name)
        except ValueError as exc:
            return fail(PROG, f"--policy: {exc}")
    for flag, value in (("--window-size", args.window_size), ("--step-interval", args.step_interval)):
        if value < 1:
            return fail(PROG, f"{flag} must be >= 1, got {value}")
    try:
        if args.trace:
            trace, source = load_trace(args.trace), {"trace": args.trace}
        else:
            spec = parse_spec(args.synthetic)
            trace, source = synthetic_trace(spec), {"synthetic": spec_dict(spec)}
    except (OSError, ValueError) as exc:
        return fail(PROG, f"{'--trace' if args.trace else '--synthetic'}: {exc}")
    steps, num_layers, num_experts = trace.shape
    try:
        check_shape(num_layers, num_experts, args.num_ranks, args.num_redundant)
    except ValueError as exc:
        return fail(PROG, f"trace of {num_layers} layers x {num_experts} experts: {exc}")
    extra = {}
    if args.eplb_config:
        try:
            extra = EPLBConfig.from_json(args.eplb_config).to_dict()
        except ValueError as exc:
            return fail(PROG, f"--eplb-config: {exc}")
    results = []
    for name in names:
        try:
            cfg = EPLBConfig.from_dict({
                **extra, "policy": name, "window_size": args.window_size,
                "step_interval": args.step_interval, "num_redundant_experts": args.num_redundant,
                "max_moves_per_rebalance": args.max_moves})
            results.append(replay(trace, cfg, args.num_ranks, num_nodes=args.num_nodes,
                                  num_groups=args.num_groups))
        except ValueError as exc:
            return fail(PROG, str(exc))
    bound = step_bound(trace, args.num_ranks, args.num_redundant)
    summaries = [r.summary() for r in results]
    print(f"trace: {steps} steps x {num_layers} layers x {num_experts} experts; "
          f"G={args.num_ranks} R={args.num_redundant}; window {args.window_size}, "
          f"interval {args.step_interval}; per-step bound mean {bound.mean():.4f}")
    print(f"{'policy':<12}{'mean bal':>10}{'p5 bal':>10}{'rebal':>7}{'moved':>9}{'ms/rebal':>10}")
    for s in summaries:
        print(f"{s['policy']:<12}{s['mean_balancedness']:>10.4f}{s['p5_balancedness']:>10.4f}"
              f"{s['rebalances']:>7}{s['copies_moved']:>9}{s['mean_policy_ms']:>10.1f}")
    if args.json:
        out = {
            "source": source,
            "shape": {"steps": steps, "layers": num_layers, "experts": num_experts},
            "num_ranks": args.num_ranks, "num_redundant": args.num_redundant,
            "num_nodes": args.num_nodes, "num_groups": args.num_groups,
            "window_size": args.window_size, "step_interval": args.step_interval,
            "max_moves": args.max_moves, "eplb_config": extra, "bound_mean": float(bound.mean()),
            "policies": summaries,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        _plot(args.plot, results, bound)
    return 0


def _plot(path: str, results: list, bound: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        ax.plot(r.balancedness.mean(1), label=r.policy, linewidth=0.8)
    ax.plot(bound.mean(1), label="per-step bound", color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("balancedness (mean over layers)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
