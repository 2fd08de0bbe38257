"""Replay a load trace through a policy as the server would.

Every step's load goes into the load estimator (a ``LoadWindow`` by default); when the trigger
fires (every ``step_interval`` steps by default) the policy computes a new placement from the
estimate (with the current placement as ``previous``), the planner diffs it, and the new
placement serves from the next step on. Each step is scored with the placement in force at that
step: balancedness is measured on loads the policy has not seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from eplb.balancer.estimate import make_load_estimator
from eplb.balancer.gain import keep_worthwhile
from eplb.balancer.placement import Placement
from eplb.balancer.planner import num_moves, plan
from eplb.balancer.policies import get_policy
from eplb.balancer.stats import balancedness, balancedness_upper_bound
from eplb.balancer.trigger import make_trigger
from eplb.config import EPLBConfig


@dataclass
class SimResult:
    policy: str
    balancedness: np.ndarray  # [steps, L]
    rebalances: int = 0
    copies_moved: int = 0
    copies_moved_cross_rank: int = 0
    policy_ms: list[float] = field(default_factory=list)
    events: list[tuple[int, str]] = field(default_factory=list)  # (first step served, reason)

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
    """Replay ``trace [steps, L, E]`` through ``policy`` with vLLM's rules (a window of
    ``window_size`` steps, a rebalance every ``step_interval`` steps); see ``replay``."""
    cfg = EPLBConfig(window_size=window_size, step_interval=step_interval,
                     num_redundant_experts=num_redundant, policy=policy,
                     max_moves_per_rebalance=max_moves)
    return replay(trace, cfg, num_ranks, num_nodes=num_nodes, num_groups=num_groups)


def replay(
    trace: np.ndarray, cfg: EPLBConfig, num_ranks: int, *, num_nodes: int = 1,
    num_groups: int = 1, label: str | None = None, use_history: bool = True,
) -> SimResult:
    """Replay ``trace [steps, L, E]`` as a server with ``cfg`` lives it, step by step: score the
    step with the placement in force, record its load in the estimator
    (``make_load_estimator``), feed its balancedness to the trigger (``make_trigger``) and, when
    it fires, fit ``cfg.policy`` on the estimate with the current placement as ``previous`` (and
    the estimator's recent steps as ``history`` unless ``use_history`` is False),
    keep only layers worth their moves (``cfg.skip_gain_threshold``) and serve the result from
    the next step on (a rebalance that lands at once; async EPLB lands some steps later)."""
    fn = get_policy(cfg.policy)
    steps, num_layers, num_experts = trace.shape
    num_redundant = cfg.num_redundant_experts
    placement = Placement.default(num_layers, num_experts, num_ranks, num_redundant)
    estimator = make_load_estimator(cfg, num_layers, num_experts)
    trigger = make_trigger(cfg)
    loads = torch.from_numpy(np.ascontiguousarray(trace))
    result = SimResult(label or cfg.policy, np.empty((steps, num_layers)))
    for t in range(steps):
        bal = balancedness(loads[t], placement)
        result.balancedness[t] = bal.numpy()
        estimator.record(loads[t])
        trigger.observe(float(bal.mean()))
        decision = trigger.decide()
        if not decision.rebalance or t + 1 == steps:  # a rebalance after the last step never serves
            continue
        if decision.fit_steps is not None:
            estimator.keep_last(decision.fit_steps)
        estimate = estimator.total()
        trigger.started(decision)
        if float(estimate.sum()) <= 0:  # nothing to fit (the controller skips these too)
            continue
        t0 = time.perf_counter()
        new = fn(estimate, num_ranks, num_redundant, num_nodes=num_nodes, num_groups=num_groups,
                 previous=placement, max_moves=cfg.max_moves_per_rebalance,
                 history=estimator.steps() if use_history else None)
        new = keep_worthwhile(estimate, placement, new, cfg.skip_gain_threshold)
        result.policy_ms.append((time.perf_counter() - t0) * 1000)
        transfers = plan(placement, new)
        result.rebalances += 1
        result.events.append((t + 1, decision.reason))
        result.copies_moved += num_moves(transfers)
        result.copies_moved_cross_rank += num_moves(transfers, cross_rank_only=True)
        placement = new
    return result


def hindsight(trace: np.ndarray, policy: str, num_ranks: int, num_redundant: int, *,
              step_interval: int, num_nodes: int = 1, num_groups: int = 1,
              extra_cuts: tuple[int, ...] = ()) -> np.ndarray:
    """``[steps, L]``: balancedness of each interval of ``step_interval`` steps under ``policy``
    fit on that very interval (an oracle that knows the interval's traffic in advance);
    ``extra_cuts``: more steps where a segment starts (e.g. a known load shift)."""
    fn = get_policy(policy)
    steps, num_layers, _ = trace.shape
    loads = torch.from_numpy(np.ascontiguousarray(trace))
    out = np.empty((steps, num_layers))
    cuts = sorted({*range(0, steps, step_interval), *(c for c in extra_cuts if 0 < c < steps)}) + [steps]
    for a, b in zip(cuts, cuts[1:]):
        chunk = loads[a:b]
        p = fn(chunk.sum(0), num_ranks, num_redundant, num_nodes=num_nodes, num_groups=num_groups)
        out[a:b] = balancedness(chunk, p).numpy()
    return out


def step_bound(trace: np.ndarray, num_ranks: int, num_redundant: int) -> np.ndarray:
    """``[steps, L]``: the best balancedness any placement could reach on each step's own load
    (an oracle that re-places every step; no real policy can beat it)."""
    return np.stack([balancedness_upper_bound(torch.from_numpy(x), num_ranks, num_redundant).numpy()
                     for x in trace])
