"""Swap local search on the max rank load, all layers at once (``refined``'s last step).

Each round, every still-active layer swaps one replica of its heaviest rank with one replica on
one of its ``NEAR`` lightest ranks: the swap that minimises the larger of the two new loads,
never creating a second copy of an expert on a rank. ``eplb.balancer.reference.swap_search``
is the same search written one layer and one candidate at a time; a test checks they agree.

The arrays are small, so the cost is numpy call overhead, not arithmetic: the state is kept in
flat arrays updated through precomputed flat offsets, one fancy update per array and round.
"""

from __future__ import annotations

import numpy as np

REL = 1e-9  # relative tolerance for "no worse" between float loads
NEAR = 8  # light ranks a heavy rank may swap with per round


def bincount2d(index: np.ndarray, size: int) -> np.ndarray:
    """``index [L, n]`` with values in ``[0, size)`` -> ``[L, size]`` counts per row."""
    rows = index.shape[0]
    flat = (index + (np.arange(rows) * size)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size)


def heavy_rank_by_levels(rank_load: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rank_load [L, G]``, ``levels [L, G]`` (descending, tolerance included) ->
    ``(rank [L], any over [L])``: the heaviest rank whose load exceeds the level at its position
    in the stable descending order of rank loads.

    Found from sorted values (np.sort is several times cheaper than a stable argsort): the k-th
    position holds the (k - #heavier)-th rank, by index, of those with its load."""
    rows = np.arange(rank_load.shape[0])
    desc = np.sort(rank_load, axis=1)[:, ::-1]
    over = desc > levels
    pos = over.argmax(1)
    value = desc[rows, pos][:, None]
    equal = rank_load == value
    nth_equal = pos - (rank_load > value).sum(1)
    rank = equal.argmax(1)
    tied = np.flatnonzero(nth_equal > 0)
    if tied.size:
        rank[tied] = (equal[tied] & (np.cumsum(equal[tied], 1) == nth_equal[tied, None] + 1)).argmax(1)
    return rank, over.any(1)


def swap_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    num_ranks: int,
    target: np.ndarray | None = None,
    budget: np.ndarray | None = None,
    levels: np.ndarray | None = None,
    max_iters: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Swap local search on a copy of ``phy2log [L, P]`` for ``load [L, E]``.

    A layer stops when no swap lowers its max, when its max is <= ``target [L]``, or when
    ``budget [L]`` (copies it may still move; 2 per swap) runs out. With ``levels [L, G]``
    (descending), the rank worked on is instead the heaviest one whose load exceeds the level at
    its position in the descending order of rank loads, and a layer stops when none does: this
    matches a whole load profile (e.g. a fresh placement's), not only its max.
    Returns ``(phy2log [L, P], swaps done per layer [L])``.
    """
    num_layers, num_slots = phy2log.shape
    num_experts = load.shape[1]
    slots_per_rank = num_slots // num_ranks
    layers = np.arange(num_layers)
    replicas = bincount2d(phy2log, num_experts)

    # Flat state. expert_at[l*P + s]: the expert in slot s; slot_load: its share of that load;
    # holds[l*G*E + g*E + e]: copies of e on rank g (a narrow type keeps gathers in cache).
    expert_at = np.array(phy2log, dtype=np.int64).ravel()
    slot_load = (load / np.maximum(replicas, 1))[layers[:, None], phy2log].ravel()
    rank_load = slot_load.reshape(num_layers, num_ranks, slots_per_rank).sum(-1)  # [L, G]
    rank_load_flat = rank_load.reshape(-1)  # a view: updates show in rank_load
    rank_of_slot = np.arange(num_slots) // slots_per_rank
    hold_type = np.int16 if num_slots < np.iinfo(np.int16).max else np.int64
    holds = bincount2d(rank_of_slot * num_experts + phy2log, num_ranks * num_experts)
    holds = holds.ravel().astype(hold_type)
    layer_holds = num_ranks * num_experts  # stride of one layer in holds

    swaps = np.zeros(num_layers, dtype=np.int64)
    active = np.ones(num_layers, dtype=bool)
    min_gain = 1e-12 * np.maximum(load.sum(1), 1.0)  # a swap must lower the max by more
    slot_in_rank = np.arange(slots_per_rank)
    num_near = min(num_ranks, NEAR)
    num_partners = num_near * slots_per_rank  # candidate slots on the light ranks
    level = None if levels is None else levels * (1 + REL) + 1e-12
    stop_at = None if target is None else target * (1 + REL) + 1e-12

    for _ in range(max_iters):
        if level is None:
            heavy = rank_load.argmax(1)
        else:
            heavy, any_over = heavy_rank_by_levels(rank_load, level)
            active &= any_over
        heavy_load = rank_load[layers, heavy]
        if stop_at is not None:
            active &= heavy_load > stop_at
        if budget is not None:
            active &= swaps * 2 + 2 <= budget
        act = np.flatnonzero(active)
        n = act.size
        if n == 0:
            break
        heavy_a, top = heavy[act], heavy_load[act]
        loads_a = rank_load[act]
        if num_near < num_ranks:
            light = np.argpartition(loads_a, num_near - 1, axis=1)[:, :num_near]
        else:
            light = np.broadcast_to(np.arange(num_ranks), (n, num_ranks))
        # Flat slot indices: the heavy rank's slots [n, S], the light ranks' slots [n, near * S].
        slot_a = (act * num_slots + heavy_a * slots_per_rank)[:, None] + slot_in_rank
        slot_b = ((act * num_slots)[:, None, None] + light[:, :, None] * slots_per_rank
                  + slot_in_rank).reshape(n, num_partners)
        exp_a, w_a, exp_b, w_b = expert_at[slot_a], slot_load[slot_a], expert_at[slot_b], slot_load[slot_b]
        holds_base = (act * layer_holds)[:, None]
        # A partner on the heavy rank itself, or whose expert the heavy rank already holds, is
        # ruled out by an infinite partner-rank load.
        b_blocked = (light == heavy_a[:, None])[:, :, None] | (
            holds[holds_base + heavy_a[:, None] * num_experts + exp_b] != 0
        ).reshape(n, num_near, slots_per_rank)
        light_load = loads_a.reshape(-1)[(np.arange(n) * num_ranks)[:, None] + light]
        partner_load = np.where(b_blocked, np.inf, light_load[:, :, None]).reshape(n, num_partners)
        moved = w_a[:, :, None] - w_b[:, None, :]  # [n, S, near * S]: load leaving the heavy rank
        new_max = np.maximum(top[:, None, None] - moved, partner_load[:, None, :] + moved)
        # A light rank that already holds a's expert is ruled out for all its slots.
        a_blocked = holds[(holds_base + light * num_experts)[:, None, :] + exp_a[:, :, None]] != 0
        new_max.reshape(n, slots_per_rank, num_near, slots_per_rank)[...] += np.where(
            a_blocked, np.inf, 0.0)[..., None]
        score = new_max.reshape(n, -1)
        best = score.argmin(1)
        found = score[np.arange(n), best] < top - min_gain[act]
        active[act[~found]] = False
        if not found.any():
            break
        _apply_swaps(
            act[found], slot_a[found, best[found] // num_partners],
            slot_b[found, best[found] % num_partners], heavy_a[found],
            light[found, (best[found] % num_partners) // slots_per_rank],
            expert_at, slot_load, rank_load_flat, holds, num_ranks, num_experts)
        swaps[act[found]] += 1
    return expert_at.reshape(num_layers, num_slots), swaps


def _apply_swaps(
    layer: np.ndarray, slot_a: np.ndarray, slot_b: np.ndarray, rank_a: np.ndarray,
    rank_b: np.ndarray, expert_at: np.ndarray, slot_load: np.ndarray, rank_load_flat: np.ndarray,
    holds: np.ndarray, num_ranks: int, num_experts: int,
) -> None:
    """Swap flat slots ``slot_a`` and ``slot_b`` (one pair per layer) in the flat state, in place.
    One fancy update per array: all cells are distinct (the two ranks and the two experts of a
    swap differ, and each layer swaps once per round)."""
    exp_a, exp_b = expert_at[slot_a], expert_at[slot_b]
    w_a, w_b = slot_load[slot_a], slot_load[slot_b]
    both = np.concatenate([slot_a, slot_b])
    expert_at[both] = np.concatenate([exp_b, exp_a])
    slot_load[both] = np.concatenate([w_b, w_a])
    rank_load_flat[np.concatenate([layer * num_ranks + rank_a, layer * num_ranks + rank_b])] += (
        np.concatenate([w_b - w_a, w_a - w_b]))
    base_a = layer * num_ranks * num_experts + rank_a * num_experts
    base_b = layer * num_ranks * num_experts + rank_b * num_experts
    holds[np.concatenate([base_a + exp_a, base_b + exp_b])] -= 1
    holds[np.concatenate([base_a + exp_b, base_b + exp_a])] += 1
