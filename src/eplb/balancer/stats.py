"""Load statistics: the sliding window of per-step loads, balancedness and its upper bound."""

from __future__ import annotations

import torch

from eplb.balancer.placement import Placement
from eplb.balancer.refined import replicate_capped


class LoadWindow:
    """Ring buffer of the last ``window_size`` per-step loads ``[L, E]`` and their running total."""

    def __init__(self, window_size: int, num_layers: int, num_experts: int) -> None:
        for name, value in (("window_size", window_size), ("num_layers", num_layers),
                            ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.window_size = window_size
        self.buffer = torch.zeros(window_size, num_layers, num_experts, dtype=torch.long)
        self._total = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self.num_recorded = 0  # steps recorded since creation (not capped at window_size)
        self._held = 0  # steps in the buffer that count (keep_last drops the others)

    def record(self, load: torch.Tensor) -> None:
        """Add one step's ``load [L, E]`` (integers), evicting the oldest step when full."""
        load = torch.as_tensor(load)
        if tuple(load.shape) != tuple(self._total.shape):
            raise ValueError(
                f"load must have shape {tuple(self._total.shape)} [layers, experts], "
                f"got {tuple(load.shape)}"
            )
        load = load.to(torch.long)
        idx = self.num_recorded % self.window_size
        # Integer arithmetic keeps the running total exact however long the server runs.
        self._total += load - self.buffer[idx]
        self.buffer[idx] = load
        self.num_recorded += 1
        self._held = min(self._held + 1, self.window_size)

    def total(self) -> torch.Tensor:
        """``[L, E]``: the summed load of the steps in the window."""
        return self._total.clone()

    def reset(self) -> None:
        self.buffer.zero_()
        self._total.zero_()
        self.num_recorded = 0
        self._held = 0

    def steps(self) -> torch.Tensor:
        """``[n, L, E]``: the steps the window holds, oldest first (n <= window_size; after
        ``keep_last(k)`` only those k and the steps recorded since)."""
        n = self._held
        idx = [(self.num_recorded - n + i) % self.window_size for i in range(n)]
        return self.buffer[idx]

    def keep_last(self, steps: int) -> None:
        """Forget every step but the last ``min(steps, window_size)`` (after a load shift the
        older steps mislead the next placement); ``num_recorded`` is unchanged."""
        n = min(steps, self._held)
        self._held = n
        newest = self.num_recorded - 1
        keep = torch.zeros(self.window_size, dtype=torch.bool)
        keep[[(newest - age) % self.window_size for age in range(n)]] = True
        self.buffer[~keep] = 0
        self._total = self.buffer.sum(0)


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``load [..., L, E]`` -> ``[..., L, G]``: each rank's load, an expert's load split evenly
    over its replicas."""
    load = torch.as_tensor(load, dtype=torch.float64)
    if tuple(load.shape[-2:]) != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"load must end in [layers={placement.num_layers}, experts={placement.num_experts}], "
            f"got {tuple(load.shape)}"
        )
    per_replica = load / placement.replica_count.to(torch.float64)
    index = placement.phy2log.expand(*load.shape[:-2], -1, -1)
    slot_load = per_replica.gather(-1, index)
    return slot_load.unflatten(-1, (placement.num_ranks, placement.slots_per_rank)).sum(-1)


def balancedness(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``load [..., L, E]`` -> ``[..., L]``: mean rank load / max rank load (1.0 = perfect;
    a layer with no load counts as 1.0)."""
    ranks = rank_loads(load, placement)
    peak = ranks.amax(-1)
    return torch.where(peak > 0, ranks.mean(-1) / peak.clamp_min(1e-300), torch.ones_like(peak))


def min_max_replica_load(load: torch.Tensor, num_physical: int) -> torch.Tensor:
    """``[L, E]`` -> ``[L]``: the smallest possible max per-replica load with ``num_physical``
    replicas in all (every expert >= 1). Adding a replica to the expert with the highest load per
    replica is optimal for this min-max, so the greedy gives the exact value."""
    w = torch.as_tensor(load, dtype=torch.float64).numpy()
    count = replicate_capped(w, num_physical, num_physical)
    return torch.from_numpy((w / count).max(1))


def balancedness_upper_bound(load: torch.Tensor, num_ranks: int, num_redundant: int) -> torch.Tensor:
    """``[L, E]`` -> ``[L]``: the best balancedness any placement can reach for this load.

    It is mean rank load divided by a lower bound on the max rank load,
    ``max(total / G, heaviest replica after the best possible replication)``: some rank carries at
    least the mean, and the rank holding the heaviest replica carries at least that replica.
    No placement's balancedness exceeds it.
    """
    load = torch.as_tensor(load, dtype=torch.float64)
    num_experts = load.shape[-1]
    mean = load.sum(-1) / num_ranks
    peak = torch.maximum(mean, min_max_replica_load(load, num_experts + num_redundant))
    return torch.where(peak > 0, mean / peak.clamp_min(1e-300), torch.ones_like(peak))
