"""Whether a new placement is worth its moves: predicted gain on the load estimate.

A rebalance moves expert weights (bandwidth, staging memory) for a gain measured on the load
it was fit to. ``keep_worthwhile`` takes the new placement only on layers whose predicted
balancedness gain reaches ``min_gain`` (others keep the old one: no transfer), and
``worth_rebalancing`` says whether any layer is left, so a rebalance whose gain is too small
is skipped whole. ``min_gain`` 0 keeps every layer that changed (vLLM's behaviour).
"""

from __future__ import annotations

import torch

from eplb.balancer.placement import Placement
from eplb.balancer.stats import balancedness


def predicted_gain(estimate: torch.Tensor, old: Placement, new: Placement) -> torch.Tensor:
    """``estimate [L, E]`` -> ``[L]``: balancedness of ``new`` minus that of ``old`` on it."""
    return balancedness(estimate, new) - balancedness(estimate, old)


def keep_worthwhile(estimate: torch.Tensor, old: Placement, new: Placement,
                    min_gain: float) -> Placement:
    """``new`` on the layers whose predicted gain is >= ``min_gain`` (absolute balancedness,
    e.g. 0.01 = one point), ``old`` elsewhere. ``min_gain <= 0`` returns ``new`` unchanged."""
    if min_gain <= 0:
        return new
    take = predicted_gain(estimate, old, new) >= min_gain
    if bool(take.all()):
        return new
    phy2log = torch.where(take[:, None], new.phy2log, old.phy2log)
    return Placement.from_phy2log(phy2log, new.num_experts, new.num_ranks)


def worth_rebalancing(estimate: torch.Tensor, old: Placement, new: Placement,
                      min_gain: float) -> bool:
    """False when no layer's predicted gain reaches ``min_gain`` (> 0): skip the rebalance.
    Always True for ``min_gain <= 0`` (never skip)."""
    if min_gain <= 0:
        return True
    return bool((predicted_gain(estimate, old, new) >= min_gain).any())
