"""Plain reference versions of the balancer's vectorised searches: one layer and one candidate at
a time, for tests (``tests/test_balancer_swap.py`` checks the fast versions agree exactly)."""

from __future__ import annotations

import numpy as np

from eplb.balancer.swap import NEAR, REL


def swap_search(
    phy2log: np.ndarray,
    load: np.ndarray,
    num_ranks: int,
    target: np.ndarray | None = None,
    budget: np.ndarray | None = None,
    levels: np.ndarray | None = None,
    max_iters: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and result as ``eplb.balancer.swap.swap_search``; layers are independent,
    so this runs them one after the other."""
    out = np.array(phy2log, dtype=np.int64)
    swaps = np.zeros(out.shape[0], dtype=np.int64)
    for layer in range(out.shape[0]):
        swaps[layer] = _swap_layer(
            out[layer], load[layer], num_ranks,
            None if target is None else target[layer] * (1 + REL) + 1e-12,
            None if budget is None else budget[layer],
            None if levels is None else levels[layer] * (1 + REL) + 1e-12,
            max_iters)
    return out, swaps


def _swap_layer(row: np.ndarray, load: np.ndarray, num_ranks: int, stop_at: float | None,
                budget: int | None, level: np.ndarray | None, max_iters: int) -> int:
    """Swap in place in ``row [P]``; returns the number of swaps."""
    num_slots = row.size
    per_rank = num_slots // num_ranks
    replicas = np.bincount(row, minlength=load.size)
    slot_load = load[row] / np.maximum(replicas[row], 1)
    rank_load = slot_load.reshape(num_ranks, per_rank).sum(-1)

    def rank_of(slot: int) -> int:
        return slot // per_rank

    def holds(rank: int, expert: int) -> bool:
        return bool((row[rank * per_rank:(rank + 1) * per_rank] == expert).any())

    min_gain = 1e-12 * max(load.sum(), 1.0)
    swaps = 0
    for _ in range(max_iters):
        if level is None:
            heavy = int(np.argmax(rank_load))
        else:
            # Stable descending order of rank loads (ties by rank index); the first position
            # whose load exceeds its level names the rank to work on.
            order = sorted(range(num_ranks), key=lambda g: -rank_load[g])
            over = [k for k in range(num_ranks) if rank_load[order[k]] > level[k]]
            if not over:
                break
            heavy = order[over[0]]
        top = rank_load[heavy]
        if stop_at is not None and top <= stop_at:
            break
        if budget is not None and swaps * 2 + 2 > budget:
            break
        near = min(num_ranks, NEAR)
        # The same light ranks, in the same order, as the fast version's argpartition.
        light = (np.argpartition(rank_load[None], near - 1, axis=1)[0, :near] if near < num_ranks
                 else np.arange(num_ranks))
        best, best_pair = np.inf, None
        for a in range(heavy * per_rank, (heavy + 1) * per_rank):
            for g in light:
                for b in range(g * per_rank, (g + 1) * per_rank):
                    if g == heavy or holds(heavy, row[b]) or holds(g, row[a]):
                        continue
                    moved = slot_load[a] - slot_load[b]
                    new_max = max(top - moved, rank_load[g] + moved)
                    if new_max < best:  # strict: the first best candidate wins ties
                        best, best_pair = new_max, (a, b)
        if best_pair is None or not best < top - min_gain:
            break
        a, b = best_pair
        moved = slot_load[a] - slot_load[b]
        rank_load[rank_of(a)] -= moved
        rank_load[rank_of(b)] += moved
        row[a], row[b] = row[b], row[a]
        slot_load[a], slot_load[b] = slot_load[b], slot_load[a]
        swaps += 1
    return swaps
