"""Load-aware replica choice for one forward step: split each expert's pairs over its replicas by
water-filling over the replicas' ranks, instead of a static round robin.

Pure torch, device-agnostic and CUDA-graph-safe: fixed shapes (``[N]``, ``[E, M]``, ``[G]``), no
``.item()``, no data-dependent shapes, no host sync (``scatter_add`` instead of ``bincount``,
``searchsorted`` instead of ``unique``). Exact: a pair always goes to a slot that holds its own
logical expert, so only which rank computes it changes, never the answer.

Model: a rank's load is the pairs its slots compute. Pairs of single-replica experts (and
``rank_load``, load already known on the ranks) are fixed; each expert with ``c > 1``
replicas pours its ``n`` pairs into its replicas' ranks so they level up: the water level
``lam`` solves ``sum_i max(0, lam - b_i) = n`` over the replicas' rank loads ``b_i``, and
replica ``i`` gets ``max(0, lam - b_i)``, rounded to integers that sum to ``n``. Experts that
share ranks see each other's pairs through ``rounds`` (Jacobi) passes. A second replica of an
expert on one rank gets no share (it would only split that rank's pairs between two slots).
"""

from __future__ import annotations

import torch


def pair_rank_in_expert(ids: torch.Tensor) -> torch.Tensor:
    """``ids [N]`` -> ``[N]``: how many earlier pairs (in order) went to the same expert."""
    sorted_e, perm = torch.sort(ids, stable=True)
    # sorted position - first position of that expert (searchsorted: no host sync on CUDA)
    rank_sorted = torch.arange(ids.numel(), device=ids.device) - torch.searchsorted(sorted_e, sorted_e)
    j = torch.empty_like(ids)
    j[perm] = rank_sorted
    return j


def _water_level(levels: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """``levels [E, M]`` (+inf where absent), ``amount [E]`` -> the level ``lam [E]`` with
    ``sum_i max(0, lam - levels_i) = amount``: ``min_k (amount + sum of the k lowest) / k``
    (every candidate is >= the true level, and the one with the right k equals it)."""
    low, _ = torch.sort(levels, dim=1)
    k = torch.arange(1, levels.shape[1] + 1, device=levels.device, dtype=levels.dtype)
    # +inf entries make their candidates +inf (never the min); keep nan out of the cumsum
    finite = torch.isfinite(low)
    csum = torch.cumsum(torch.where(finite, low, torch.zeros_like(low)), 1)
    cand = torch.where(finite, (amount[:, None] + csum) / k, torch.full_like(low, float("inf")))
    return cand.min(1).values


def water_fill_slots(
    ids: torch.Tensor, log2phy: torch.Tensor, replica_count: torch.Tensor, slots_per_rank: int,
    num_ranks: int, rank_load: torch.Tensor | None = None, rounds: int = 2,
) -> torch.Tensor:
    """Physical slot for each (token, expert) pair.

    ``ids [N]`` logical experts (long), ``log2phy [E, M]`` slots of each expert (-1 padded, at
    least the first ``replica_count[e]`` columns valid), ``replica_count [E]``, ``rank_load [G]``
    (optional, load already on each rank this step, any real dtype) -> ``slots [N]`` long with
    ``phy2log[slots] == ids``; per expert the pair counts per replica sum to its pair count.
    """
    device = ids.device
    num_experts, width = log2phy.shape
    f = torch.float64 if device.type == "cpu" else torch.float32
    pairs = torch.zeros(num_experts, dtype=f, device=device).scatter_add_(
        0, ids, torch.ones(ids.shape, dtype=f, device=device))
    col = torch.arange(width, device=device)
    valid = col[None, :] < replica_count[:, None]  # [E, M]
    rank = torch.where(valid, log2phy, torch.zeros_like(log2phy)) // slots_per_rank  # [E, M]
    single = replica_count == 1
    base = torch.zeros(num_ranks, dtype=f, device=device)
    if rank_load is not None:
        base = base + rank_load.to(f)
    base = base.scatter_add(0, rank[:, 0], torch.where(single, pairs, torch.zeros_like(pairs)))
    # A second replica on a rank that already has one adds nothing to fill: it takes no share.
    same = (rank[:, :, None] == rank[:, None, :]) & valid[:, None, :]  # [E, M, M]
    first_on_rank = ~(same & (col[None, :] < col[:, None])[None]).any(2)
    valid = valid & first_on_rank
    multi = (valid & ~single[:, None]).to(f)  # [E, M]
    inf = torch.full((num_experts, width), float("inf"), dtype=f, device=device)
    share = torch.zeros(num_experts, width, dtype=f, device=device)
    for _ in range(max(1, rounds)):
        # every multi-replica expert's pairs on each rank, except this replica's own
        poured = torch.zeros(num_ranks, dtype=f, device=device).scatter_add(
            0, rank.reshape(-1), (share * multi).reshape(-1))
        level = torch.where(valid, base[rank] + poured[rank] - share, inf)
        lam = _water_level(level, pairs)
        share = torch.clamp(lam[:, None] - level, min=0) * valid.to(f)
    # Integer cut points: replica i takes the expert's pairs j with cut[i-1] <= j < cut[i].
    cut = torch.floor(torch.cumsum(share, 1) + 0.5)
    last = col[None, :] + 1 >= replica_count[:, None]
    cut = torch.where(last, pairs[:, None], torch.minimum(cut, pairs[:, None]))
    j = pair_rank_in_expert(ids).to(f)
    rep = (cut[ids] <= j[:, None]).sum(1)  # [N]: cut points at or below j
    rep = torch.minimum(rep, replica_count[ids] - 1)
    return log2phy[ids, rep]


def static_slots(ids: torch.Tensor, log2phy: torch.Tensor, replica_count: torch.Tensor,
                 offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Today's static split: the j-th pair (in order) of expert e goes to replica
    ``(offset + j) % replica_count[e]``. ``ids [N]`` -> ``slots [N]``."""
    rep = (offset + pair_rank_in_expert(ids)) % replica_count[ids]
    return log2phy[ids, rep]
