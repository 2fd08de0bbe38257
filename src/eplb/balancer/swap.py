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

    layer_g = layers * num_ranks  # flat offsets of each layer's rows
    layer_s = layers * num_slots
    layer_h = layers * layer_holds
    for _ in range(max_iters):
        if level is None:
            heavy = rank_load.argmax(1)
        else:
            heavy, any_over = heavy_rank_by_levels(rank_load, level)
            active &= any_over
        heavy_load = rank_load_flat[layer_g + heavy]
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
        base_s = layer_s[act]
        slot_a = (base_s + heavy_a * slots_per_rank)[:, None] + slot_in_rank
        slot_b = ((base_s[:, None] + light * slots_per_rank)[:, :, None]
                  + slot_in_rank).reshape(n, num_partners)
        exp_a, w_a, exp_b, w_b = expert_at[slot_a], slot_load[slot_a], expert_at[slot_b], slot_load[slot_b]
        base_h = layer_h[act]
        heavy_h = base_h + heavy_a * num_experts
        light_h = base_h[:, None] + light * num_experts  # [n, near]
        # A partner on the heavy rank itself, or whose expert the heavy rank already holds, is
        # ruled out by an infinite partner-rank load.
        light_load = rank_load_flat[layer_g[act][:, None] + light]
        light_load[light == heavy_a[:, None]] = np.inf
        partner_load = np.repeat(light_load, slots_per_rank, axis=1)
        partner_load[holds[heavy_h[:, None] + exp_b] != 0] = np.inf
        moved = w_a[:, :, None] - w_b[:, None, :]  # [n, S, near * S]: load leaving the heavy rank
        new_max = np.maximum(top[:, None, None] - moved, partner_load[:, None, :] + moved)
        # A light rank that already holds a's expert is ruled out for all its slots.
        a_blocked = holds[light_h[:, None, :] + exp_a[:, :, None]] != 0  # [n, S, near]
        if a_blocked.any():
            new_max.reshape(n, slots_per_rank, num_near, slots_per_rank)[a_blocked] = np.inf
        score = new_max.reshape(n, -1)
        best = score.argmin(1)
        found = score[np.arange(n), best] < top - min_gain[act]
        if not found.all():
            active[act[~found]] = False
            if not found.any():
                break
            act, best, slot_a, slot_b, heavy_a, light = (
                act[found], best[found], slot_a[found], slot_b[found], heavy_a[found], light[found])
            heavy_h, light_h = heavy_h[found], light_h[found]
        k = np.arange(act.size)
        ia, ib = best // num_partners, best % num_partners
        sa, sb = slot_a[k, ia], slot_b[k, ib]
        # Swap the two slots in the flat state: all cells are distinct (the two ranks and the two
        # experts of a swap differ, and each layer swaps once per round).
        ea, eb = expert_at[sa], expert_at[sb]
        wa, wb = slot_load[sa], slot_load[sb]
        expert_at[sa], expert_at[sb] = eb, ea
        slot_load[sa], slot_load[sb] = wb, wa
        d = wb - wa
        rank_load_flat[layer_g[act] + heavy_a] += d
        rank_load_flat[layer_g[act] + light[k, ib // slots_per_rank]] -= d
        hb = light_h[k, ib // slots_per_rank]
        holds[heavy_h + ea] -= 1
        holds[hb + eb] -= 1
        holds[heavy_h + eb] += 1
        holds[hb + ea] += 1
        swaps[act] += 1
    return expert_at.reshape(num_layers, num_slots), swaps

