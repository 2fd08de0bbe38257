"""``eplb rebalance``: one placement for a load matrix ``[L, E]`` (``.npy``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from eplb.balancer.placement import Placement
from eplb.balancer.planner import num_moves, plan
from eplb.balancer.policies import POLICIES, get_policy
from eplb.balancer.stats import balancedness, balancedness_upper_bound
from eplb.cli_common import add_layout_arguments, fail, one_line_errors

PROG = "eplb rebalance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser, PROG)
    parser.add_argument("--load", required=True, help="load matrix [layers, experts] as .npy")
    add_layout_arguments(parser)
    parser.add_argument("--policy", default="deepseek", help=f"one of: {', '.join(POLICIES)}")
    parser.add_argument("--previous", default=None,
                        help="current placement JSON (from --json or Placement.save)")
    parser.add_argument("--json", default=None, help="write the result here")


def main(args: argparse.Namespace) -> int:
    # Policies run many small tensor ops: extra threads only add overhead (and contend).
    torch.set_num_threads(1)
    try:
        policy = get_policy(args.policy)
    except ValueError as exc:
        return fail(PROG, f"--policy: {exc}")
    try:
        load = np.load(args.load, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return fail(PROG, f"--load: cannot read {args.load}: {exc}")
    if load.ndim != 2 or not (np.issubdtype(load.dtype, np.integer) or np.issubdtype(load.dtype, np.floating)):
        return fail(PROG, f"--load: expected a numeric [layers, experts] array, got shape {load.shape} {load.dtype}")
    previous = None
    if args.previous:
        try:
            previous = Placement.load(args.previous)
        except (OSError, ValueError) as exc:
            return fail(PROG, f"--previous: {exc}")
    load_t = torch.from_numpy(np.ascontiguousarray(load))
    try:
        t0 = time.perf_counter()
        placement = policy(load_t, args.num_ranks, args.num_redundant, num_nodes=args.num_nodes,
                           num_groups=args.num_groups, previous=previous, max_moves=args.max_moves)
        policy_ms = (time.perf_counter() - t0) * 1000
    except ValueError as exc:
        return fail(PROG, str(exc))
    bal = balancedness(load_t, placement)
    bound = balancedness_upper_bound(load_t, args.num_ranks, args.num_redundant)
    moved = None if previous is None else num_moves(plan(previous, placement))
    result = {
        **placement.to_json(),
        "policy": args.policy,
        "replica_count": placement.replica_count.tolist(),
        "balancedness": bal.tolist(),
        "balancedness_upper_bound": bound.tolist(),
        "moved_experts": moved,
        "policy_ms": policy_ms,
    }
    print(f"policy {args.policy}: {placement.num_layers} layers x {placement.num_physical} slots "
          f"on {args.num_ranks} ranks")
    print(f"balancedness mean {bal.mean():.4f} min {bal.min():.4f} (bound mean {bound.mean():.4f})")
    print(f"moved experts {moved if moved is not None else '-'}; policy time {policy_ms:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    return 0
