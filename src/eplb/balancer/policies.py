"""Policy registry. A policy maps a window's load to a new placement:

``policy(load[L, E], num_ranks, num_redundant, *, num_nodes=1, num_groups=1, previous=None,
max_moves=None, history=None) -> Placement``

- ``deepseek``: DeepSeek's published greedy EPLB (hierarchical when ``num_groups % num_nodes == 0``,
  else global); ignores ``previous``, ``max_moves`` and ``history``.
- ``refined``: ours (``eplb.balancer.refined``): capped replication, greedy packing that avoids two
  copies of an expert on one rank, swap local search toward the lower bound, and a migration-aware
  warm start from ``previous`` with an optional ``max_moves`` cap. It balances over all ranks
  (``num_nodes``/``num_groups`` are validated but node locality of groups is not modelled).
  With ``history [K, L, E]`` (the recent per-step loads, e.g. ``LoadWindow.steps()``) and no
  ``max_moves``: each layer is fit on the estimate that forecast the history's recent steps
  best (``load`` itself, or a recency-weighted sum of the history when one was significantly
  better on steps held out from its fit: ``eplb.balancer.forecast``), and takes DeepSeek's
  global greedy placement of that estimate instead when that one is better on the history's
  steps one by one, weighted as in the estimate (``eplb.balancer.select``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from eplb.balancer.deepseek import deepseek_phy2log
from eplb.balancer.forecast import choose_fit, forecast_load
from eplb.balancer.placement import Placement, check_shape
from eplb.balancer.refined import map_to_previous, quick_placement, refined_phy2log
from eplb.balancer.select import best_per_layer

# With ``history``, a layer takes greedy's placement only when its mean per-step balancedness on
# the history is this much higher (absolute): greedy moves more copies.
SELECT_MARGIN = 0.002
SELECT_STEPS = 128  # the most recent steps of the history judged (bounds the cost)


class Policy(Protocol):
    def __call__(
        self, load: torch.Tensor, num_ranks: int, num_redundant: int, *, num_nodes: int = 1,
        num_groups: int = 1, previous: Placement | None = None, max_moves: int | None = None,
        history: torch.Tensor | None = None,
    ) -> Placement: ...


def _check_args(
    load: torch.Tensor, num_ranks: int, num_redundant: int, num_nodes: int, num_groups: int,
    previous: Placement | None, max_moves: int | None,
) -> torch.Tensor:
    load = torch.as_tensor(load)
    if load.dim() != 2:
        raise ValueError(f"load must be 2-D [layers, experts], got shape {tuple(load.shape)}")
    if load.dtype == torch.bool or load.dtype.is_complex:
        raise ValueError(f"load must be a real-valued tensor, got {load.dtype}")
    num_layers, num_experts = load.shape
    check_shape(num_layers, num_experts, num_ranks, num_redundant)
    if not bool(torch.isfinite(load.double()).all()) or bool((load < 0).any()):
        raise ValueError("load must be finite and >= 0")
    for name, value in (("num_nodes", num_nodes), ("num_groups", num_groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if num_groups % num_nodes == 0:  # the hierarchical layout needs these to divide evenly
        if num_ranks % num_nodes:
            raise ValueError(f"num_nodes ({num_nodes}) must divide num_ranks ({num_ranks})")
        if num_experts % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide num_experts ({num_experts})")
    if max_moves is not None and (isinstance(max_moves, bool) or not isinstance(max_moves, int)
                                  or max_moves < 0):
        raise ValueError(f"max_moves must be None or an integer >= 0, got {max_moves!r}")
    if previous is not None:
        want = (num_layers, num_experts + num_redundant)
        if (tuple(previous.phy2log.shape) != want or previous.num_experts != num_experts
                or previous.num_ranks != num_ranks):
            raise ValueError(
                f"previous placement must be {want[0]} layers x {want[1]} slots of {num_experts} "
                f"experts on {num_ranks} ranks, got {previous.num_layers} x {previous.num_physical} "
                f"of {previous.num_experts} on {previous.num_ranks}"
            )
    return load


def deepseek(
    load: torch.Tensor, num_ranks: int, num_redundant: int, *, num_nodes: int = 1,
    num_groups: int = 1, previous: Placement | None = None, max_moves: int | None = None,
    history: torch.Tensor | None = None,
) -> Placement:
    load = _check_args(load, num_ranks, num_redundant, num_nodes, num_groups, previous, max_moves)
    phy2log = deepseek_phy2log(load, num_ranks, num_redundant, num_nodes, num_groups)
    return Placement.from_phy2log(phy2log, load.shape[1], num_ranks)


def refined(
    load: torch.Tensor, num_ranks: int, num_redundant: int, *, num_nodes: int = 1,
    num_groups: int = 1, previous: Placement | None = None, max_moves: int | None = None,
    history: torch.Tensor | None = None,
) -> Placement:
    load = _check_args(load, num_ranks, num_redundant, num_nodes, num_groups, previous, max_moves)
    prev = None if previous is None else previous.phy2log
    step_w = None
    if history is not None and max_moves is None:
        history = _check_history(history, load.shape)
        # The forecast chooses between the window's flat sum and recency weightings of the same
        # steps; an estimate that is not that sum (e.g. the EWMA estimator's) is the caller's
        # choice of weighting and is fit as it is.
        flat = torch.equal(load.to(torch.float64), history.to(torch.float64).sum(0))
        history = history[-SELECT_STEPS:]
        step_w = torch.ones(history.shape[:2], dtype=torch.float64)
        if flat and history.shape[0]:
            # Per layer, fit on the estimate that forecast the recent steps best: the window's
            # flat sum unless a recency-weighted sum did significantly better on steps held
            # out from its fit (eplb.balancer.forecast). The candidates are compared with the
            # greedy packing alone (quick_placement): it ranks estimates, it does not serve.
            def fit(x: torch.Tensor) -> torch.Tensor:
                return quick_placement(x, num_ranks, num_redundant)

            choice, weights = choose_fit(history, fit, num_ranks)
            load, step_w = forecast_load(load, history, choice, weights)
    phy2log = refined_phy2log(load, num_ranks, num_redundant, previous=prev, max_moves=max_moves)
    ours = Placement.from_phy2log(phy2log, load.shape[1], num_ranks)
    if step_w is None or history.shape[0] == 0:
        return ours
    # DeepSeek's greedy (global) of the same estimate as a second candidate, judged step by step
    # on the history (each step weighted as in the estimate the layer was fit on).
    greedy = deepseek_phy2log(load, num_ranks, num_redundant, 1, 1)
    if previous is not None:  # its packs on the ranks that already hold most of them
        greedy = map_to_previous(greedy.long(), previous.phy2log.long(), num_ranks, load.shape[1])
    other = Placement.from_phy2log(greedy, load.shape[1], num_ranks)
    return best_per_layer(history, [ours, other], SELECT_MARGIN, weights=step_w)


def _check_history(history: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    history = torch.as_tensor(history)
    if history.dim() != 3 or tuple(history.shape[1:]) != tuple(shape):
        raise ValueError(f"history must be [steps, {shape[0]}, {shape[1]}] (steps x layers x experts), "
                         f"got {tuple(history.shape)}")
    return history


POLICIES: dict[str, Callable[..., Placement]] = {"deepseek": deepseek, "refined": refined}


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``; ValueError listing the names otherwise."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown policy {name!r}; available: {', '.join(sorted(POLICIES))}"
        ) from None
