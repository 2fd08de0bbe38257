"""Replay a load trace through a policy as the server would.

Every step's load goes into a ``LoadWindow``; after every ``step_interval`` steps the policy
computes a new placement from the window total (with the current placement as ``previous``), the
planner diffs it, and the new placement serves from the next step on. Each step is scored with
the placement in force at that step: balancedness is measured on loads the policy has not seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from eplb.balancer.placement import Placement
from eplb.balancer.planner import num_moves, plan
from eplb.balancer.policies import get_policy
from eplb.balancer.stats import LoadWindow, balancedness, balancedness_upper_bound


@dataclass
class SimResult:
    policy: str
    balancedness: np.ndarray  # [steps, L]
    rebalances: int = 0
    copies_moved: int = 0
    copies_moved_cross_rank: int = 0
    policy_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        b = self.balancedness
        return {
            "policy": self.policy,
            "mean_balancedness": float(b.mean()),
            "p5_balancedness": float(np.percentile(b, 5)),
            "rebalances": self.rebalances,
            "copies_moved": self.copies_moved,
            "copies_moved_cross_rank": self.copies_moved_cross_rank,
            "mean_policy_ms": float(np.mean(self.policy_ms)) if self.policy_ms else 0.0,
        }


def simulate(
    trace: np.ndarray, policy: str, num_ranks: int, num_redundant: int, *, window_size: int,
    step_interval: int, num_nodes: int = 1, num_groups: int = 1, max_moves: int | None = None,
) -> SimResult:
    """Replay ``trace [steps, L, E]`` through ``policy``; see the module docstring."""
    fn = get_policy(policy)
    steps, num_layers, num_experts = trace.shape
    placement = Placement.default(num_layers, num_experts, num_ranks, num_redundant)
    window = LoadWindow(window_size, num_layers, num_experts)
    loads = torch.from_numpy(np.ascontiguousarray(trace))
    result = SimResult(policy, np.empty((steps, num_layers)))
    start = 0
    while start < steps:
        end = min(start + step_interval, steps)
        # The placement is fixed inside the interval, so score all its steps at once.
        result.balancedness[start:end] = balancedness(loads[start:end], placement).numpy()
        for t in range(start, end):
            window.record(loads[t])
        if end < steps:  # a rebalance after the last step would never serve
            t0 = time.perf_counter()
            new = fn(window.total(), num_ranks, num_redundant, num_nodes=num_nodes,
                     num_groups=num_groups, previous=placement, max_moves=max_moves)
            result.policy_ms.append((time.perf_counter() - t0) * 1000)
            transfers = plan(placement, new)
            result.rebalances += 1
            result.copies_moved += num_moves(transfers)
            result.copies_moved_cross_rank += num_moves(transfers, cross_rank_only=True)
            placement = new
        start = end
    return result


def step_bound(trace: np.ndarray, num_ranks: int, num_redundant: int) -> np.ndarray:
    """``[steps, L]``: the best balancedness any placement could reach on each step's own load
    (an oracle that re-places every step; no real policy can beat it)."""
    return np.stack([balancedness_upper_bound(torch.from_numpy(x), num_ranks, num_redundant).numpy() for x in trace])
