"""Judge candidate placements on the recent steps one by one, not on their sum.

Two placements that balance a window's total equally well can differ on its steps: a tight fit
to the sum of two workload regimes may split each regime worse than a looser greedy packing.
``best_per_layer`` keeps, per layer, the first candidate unless a later one has a higher mean
per-step balancedness over ``history`` by more than ``margin``.
"""

from __future__ import annotations

import torch

from eplb.balancer.placement import Placement
from eplb.balancer.stats import balancedness


def best_per_layer(history: torch.Tensor, candidates: list[Placement], margin: float,
                   weights: torch.Tensor | None = None) -> Placement:
    """``history [K, L, E]`` (recent per-step loads), ``candidates`` (same shape, preferred
    first) -> a placement taking each layer from its chosen candidate. ``weights [K, L]``
    (optional, >= 0): how much each step counts for each layer (a recency-weighted fit is
    judged on the steps it was fit to, as weighted); the default counts every step alike."""
    first = candidates[0]
    if weights is None:
        weights = torch.ones(history.shape[:2], dtype=torch.float64)
    weights = weights.to(torch.float64) / weights.sum(0).clamp_min(1e-300)

    def mean_score(p: Placement) -> torch.Tensor:  # [L] weighted mean per-step balancedness
        return (balancedness(history, p).to(torch.float64) * weights).sum(0)

    best = mean_score(first)
    choice = torch.zeros(first.num_layers, dtype=torch.long)
    for i, cand in enumerate(candidates[1:], 1):
        score = mean_score(cand)
        better = score > best + margin
        choice[better] = i
        best = torch.where(better, score, best)
    if not bool((choice > 0).any()):
        return first
    stacked = torch.stack([c.phy2log for c in candidates])  # [C, L, P]
    phy2log = stacked[choice, torch.arange(first.num_layers)]
    return Placement.from_phy2log(phy2log, first.num_experts, first.num_ranks)
