"""Our policy: greedy + swap local search toward the lower bound, migration-aware.

All steps run on all layers at once (tensors ``[L, ...]``); only the rare replica-count changes
of the warm start loop over layers in Python.

1. Replicate: the extra slots go, one at a time, to the expert with the highest load per replica,
   but no expert gets more replicas than there are ranks (a second copy on one rank adds nothing).
2. Pack (fresh): replicas heaviest first into the lightest rank with room that does not already
   hold that expert; then swap local search: repeatedly swap one replica of the heaviest rank with
   one replica elsewhere, the swap that lowers the pair's max the most, until none helps.
3. With ``previous``: a warm start keeps the previous placement, changes only the replica counts
   that differ (freeing slots on the heaviest ranks, filling on the lightest), then runs the same
   swap search only until the layer's max rank load is no worse than the fresh solution's
   (each swap moves two copies). A layer whose warm start cannot get there takes the fresh
   solution, its packs mapped onto ranks by greedy max overlap with ``previous`` and each rank's
   slots aligned so that experts it already holds stay in their slots.
4. ``max_moves`` caps the copies a rebalance moves per layer: replica-count changes go hottest
   first, then swaps, best gain first, and the warm start is always used.
"""

from __future__ import annotations

import torch

_REL = 1e-9  # relative tolerance for "no worse" between float loads
# A warm start may be this much (relative max rank load on the window) worse than a fresh
# solution: the window's own routing noise is larger, and every avoided move is real.
TOLERANCE = 0.005


def replicate_capped(load: torch.Tensor, num_physical: int, cap: int) -> torch.Tensor:
    """``load [L, E]`` -> ``count [L, E]``, sum ``num_physical`` per layer, each in ``[1, cap]``."""
    num_layers, num_experts = load.shape
    count = torch.ones(num_layers, num_experts, dtype=torch.float64)
    rows = torch.arange(num_layers)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    for _ in range(num_physical - num_experts):
        score = torch.where(count < cap, load / count, ninf)
        count[rows, score.argmax(-1)] += 1
    return count.long()


def _expand(count: torch.Tensor) -> torch.Tensor:
    """``count [L, E]`` (equal row sums P) -> ``[L, P]`` expert ids, ascending."""
    num_layers, num_experts = count.shape
    ids = torch.arange(num_experts).repeat(num_layers)
    return torch.repeat_interleave(ids, count.flatten()).view(num_layers, -1)


def greedy_pack_distinct(load: torch.Tensor, count: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Heaviest replica first into the lightest non-full rank not holding its expert.
    Returns ``phy2log [L, P]`` (rank g owns slots ``[g*S, (g+1)*S)``)."""
    num_layers = load.shape[0]
    items = _expand(count)  # [L, P]
    num_physical = items.shape[1]
    per_slot = S = num_physical // num_ranks
    item_w = (load / count).gather(1, items)
    # Stable sort keeps replicas of one expert adjacent (items come grouped by expert).
    order = torch.sort(item_w, dim=1, descending=True, stable=True).indices
    items = items.gather(1, order)
    item_w = item_w.gather(1, order)
    rows = torch.arange(num_layers)
    rank_load = torch.zeros(num_layers, num_ranks, dtype=torch.float64)
    rank_fill = torch.zeros(num_layers, num_ranks, dtype=torch.long)
    used = torch.zeros(num_layers, num_ranks, dtype=torch.bool)  # ranks holding current expert
    out = torch.empty(num_layers, num_physical, dtype=torch.long)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    prev = torch.full((num_layers,), -1, dtype=torch.long)
    for j in range(num_physical):
        e = items[:, j]
        used &= (e == prev).unsqueeze(1)
        full = rank_fill >= per_slot
        open_load = torch.where(full, inf, rank_load)
        best_free, r_free = torch.where(used, inf, open_load).min(-1)
        # Only when every open rank already holds this expert do we accept a second copy.
        r = torch.where(torch.isinf(best_free), open_load.argmin(-1), r_free)
        out[rows, r * S + rank_fill[rows, r]] = e
        rank_load[rows, r] += item_w[:, j]
        rank_fill[rows, r] += 1
        used[rows, r] = True
        prev = e
    return out


def swap_search(
    phy2log: torch.Tensor,
    load: torch.Tensor,
    count: torch.Tensor,
    num_ranks: int,
    target: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
    max_iters: int = 10_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap local search on the max rank load, in place on a copy of ``phy2log [L, P]``.

    Each round, every still-active layer swaps one replica of its heaviest rank with one replica
    on another rank (never creating a second copy of an expert on a rank), choosing the swap that
    minimises the larger of the two new loads; a layer stops when no swap lowers its max, when its
    max is <= ``target [L]``, or when ``budget [L]`` (copies it may still move; 2 per swap) runs out.
    Returns ``(phy2log, swaps done per layer [L])``.
    """
    phy2log = phy2log.clone()
    num_layers, num_physical = phy2log.shape
    num_experts = load.shape[1]
    S = num_physical // num_ranks
    rows = torch.arange(num_layers)
    per_rep = load / count
    slot_w = per_rep.gather(1, phy2log)  # [L, P]
    rank_of = torch.arange(num_physical) // S  # [P]
    rank_load = slot_w.view(num_layers, num_ranks, S).sum(-1)
    holds = torch.zeros(num_layers, num_ranks * num_experts, dtype=torch.long)
    holds.scatter_add_(1, rank_of * num_experts + phy2log, torch.ones_like(phy2log))
    swaps = torch.zeros(num_layers, dtype=torch.long)
    active = torch.ones(num_layers, dtype=torch.bool)
    scale = load.sum(-1).clamp_min(1.0)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    ar_s = torch.arange(S)
    near = min(num_ranks, 8)
    for _ in range(max_iters):
        top, g = rank_load.max(-1)
        if target is not None:
            active &= top > target * (1 + _REL) + 1e-12
        if budget is not None:
            active &= swaps * 2 + 2 <= budget
        if not bool(active.any()):
            break
        idx = torch.nonzero(active).squeeze(1)
        # Work on the active layers only, swapping with the `near` lightest ranks: an
        # [A, S, near*S] candidate grid (the best partner is almost always a light rank).
        A = len(idx)
        gi, topi = g[idx], top[idx]
        slots_a = gi.unsqueeze(1) * S + ar_s  # [A, S]
        light = torch.topk(rank_load[idx], near, dim=1, largest=False).indices  # [A, near]
        slots_b = (light.unsqueeze(2) * S + ar_s).view(A, -1)  # [A, near*S]
        p2l = phy2log[idx]
        sw = slot_w[idx]
        ea, wa = p2l.gather(1, slots_a), sw.gather(1, slots_a)
        eb, wb = p2l.gather(1, slots_b), sw.gather(1, slots_b)
        rb = slots_b // S
        lh = rank_load[idx].gather(1, rb)  # [A, near*S]
        d = wa.unsqueeze(2) - wb.unsqueeze(1)  # [A, S, near*S]
        new_max = torch.maximum(topi.view(-1, 1, 1) - d, lh.unsqueeze(1) + d)
        # Index the flat holds table directly: copying holds[idx] would dominate the round.
        flat_h, base = holds.view(-1), (idx * holds.shape[1]).unsqueeze(1)
        at_h = (rb.unsqueeze(1) * num_experts + ea.unsqueeze(2)).view(A, -1)
        a_free = flat_h[base + at_h].view(A, S, -1) == 0  # rank of b lacks a's expert
        b_free = flat_h[base + gi.unsqueeze(1) * num_experts + eb] == 0  # rank g lacks b's
        eps = 1e-12 * scale[idx].view(-1, 1, 1)
        ok = (
            (d > eps)
            & (rb != gi.unsqueeze(1)).unsqueeze(1)
            & (new_max < topi.view(-1, 1, 1) - eps)
            & a_free
            & b_free.unsqueeze(1)
        )
        score = torch.where(ok, new_max, inf).view(A, -1)
        best, flat = score.min(-1)
        found = torch.isfinite(best)
        active[idx[~found]] = False
        if not bool(found.any()):
            break
        li = idx[found]
        flat = flat[found]
        nb = slots_b.shape[1]
        sa = slots_a[found].gather(1, (flat // nb).unsqueeze(1)).squeeze(1)
        sb = slots_b[found].gather(1, (flat % nb).unsqueeze(1)).squeeze(1)
        e_a, e_b = phy2log[li, sa], phy2log[li, sb]
        w_a, w_b = slot_w[li, sa], slot_w[li, sb]
        r_a, r_b = rank_of[sa], rank_of[sb]
        phy2log[li, sa], phy2log[li, sb] = e_b, e_a
        slot_w[li, sa], slot_w[li, sb] = w_b, w_a
        rank_load[li, r_a] += w_b - w_a
        rank_load[li, r_b] += w_a - w_b
        ones = torch.ones_like(li)
        holds.index_put_((li, r_a * num_experts + e_a), -ones, accumulate=True)
        holds.index_put_((li, r_a * num_experts + e_b), ones, accumulate=True)
        holds.index_put_((li, r_b * num_experts + e_b), -ones, accumulate=True)
        holds.index_put_((li, r_b * num_experts + e_a), ones, accumulate=True)
        swaps[li] += 1
    return phy2log, swaps


def max_rank_load(phy2log: torch.Tensor, load: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``[L]``: the heaviest rank's load, each expert's load split evenly over its replicas."""
    count = torch.zeros_like(load).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=load.dtype))
    slot_w = (load / count).gather(1, phy2log)
    return slot_w.view(phy2log.shape[0], num_ranks, -1).sum(-1).amax(-1)


def map_to_previous(new: torch.Tensor, old: torch.Tensor, num_ranks: int, num_experts: int) -> torch.Tensor:
    """Relabel the packs (ranks) of ``new [L, P]`` to maximise overlap with ``old [L, P]`` (greedy
    on the overlap matrix), then align slots inside each rank so kept experts keep their slots."""
    num_layers, num_physical = new.shape
    S = num_physical // num_ranks
    rank_of = torch.arange(num_physical) // S

    def holds(p2l: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(num_layers, num_ranks * num_experts, dtype=torch.float32)
        h.scatter_add_(1, rank_of * num_experts + p2l, torch.ones_like(p2l, dtype=torch.float32))
        return h.view(num_layers, num_ranks, num_experts)

    overlap = torch.bmm(holds(new), holds(old).transpose(1, 2))  # [L, pack, rank]
    pack_to_rank = torch.empty(num_layers, num_ranks, dtype=torch.long)
    rows = torch.arange(num_layers)
    flat = overlap.view(num_layers, -1)
    for _ in range(num_ranks):
        k = flat.argmax(-1)
        p, r = k // num_ranks, k % num_ranks
        pack_to_rank[rows, p] = r
        flat.view(num_layers, num_ranks, num_ranks)[rows, p, :] = -1.0
        flat.view(num_layers, num_ranks, num_ranks)[rows, :, r] = -1.0
    rank_to_pack = torch.empty_like(pack_to_rank).scatter_(1, pack_to_rank, torch.arange(num_ranks).expand(num_layers, -1).contiguous())
    packed = new.view(num_layers, num_ranks, S).gather(1, rank_to_pack.unsqueeze(-1).expand(-1, -1, S))
    return align_slots(packed.reshape(-1, S), old.view(-1, S)).view(num_layers, num_physical)


def _occurrence(v: torch.Tensor) -> torch.Tensor:
    """``[X, S]`` -> ``[X, S]``: how many earlier entries of the row equal this one."""
    eq = v.unsqueeze(2) == v.unsqueeze(1)
    return (eq & torch.ones(v.shape[1], v.shape[1], dtype=torch.bool).tril(-1)).sum(-1)


def align_slots(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per row (one rank): reorder the multiset ``new [X, S]`` so entries also in ``old [X, S]``
    stay in their old slots; the rest fill the freed slots in order."""
    S = new.shape[1]
    key_new = new * S + _occurrence(new)
    key_old = old * S + _occurrence(old)
    match = key_new.unsqueeze(2) == key_old.unsqueeze(1)  # [X, new, old]
    kept_new, kept_old = match.any(2), match.any(1)
    out = torch.where(kept_old, old, torch.full_like(old, -1))
    free_old = torch.argsort(kept_old.to(torch.int8), dim=1, stable=True)  # free slots first
    free_new = torch.argsort(kept_new.to(torch.int8), dim=1, stable=True)  # unplaced items first
    n_free = (~kept_old).sum(1, keepdim=True)
    j = torch.arange(S).unsqueeze(0)
    src = torch.where(j < n_free, new.gather(1, free_new), out.gather(1, free_old))
    return out.scatter(1, free_old, src)


def warm_start(
    previous: torch.Tensor, load: torch.Tensor, count: torch.Tensor, num_ranks: int,
    budget: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Change ``previous [L, P]`` so replica counts become ``count`` (or as many changes as the
    per-layer ``budget`` allows, hottest first). Returns ``(phy2log, changes per layer)``."""
    out = previous.clone()
    num_layers, num_physical = out.shape
    num_experts = load.shape[1]
    S = num_physical // num_ranks
    old_count = torch.zeros_like(count).scatter_add_(1, previous, torch.ones_like(previous))
    diff = (count - old_count)
    changed = (diff > 0).any(1)
    changes = torch.zeros(num_layers, dtype=torch.long)
    for layer in torch.nonzero(changed).squeeze(1).tolist():
        row = out[layer].tolist()
        w = load[layer].tolist()
        d = diff[layer].tolist()
        cnt = count[layer].tolist()
        # Rank loads under the target counts, recomputed as we go.
        rank_load = [0.0] * num_ranks
        for s, e in enumerate(row):
            rank_load[s // S] += w[e] / max(old_count[layer, e].item(), 1)
        # Deficit replicas, hottest per-replica load first.
        want = sorted(((w[e] / cnt[e], e) for e in range(num_experts) for _ in range(max(d[e], 0))),
                      reverse=True)
        limit = len(want) if budget is None else min(len(want), budget[layer])
        cur = [int(old_count[layer, e]) for e in range(num_experts)]
        for _, e in want[:limit]:
            on_rank = {s // S for s, x in enumerate(row) if x == e}
            # Take a slot of an expert with surplus replicas: prefer ranks not holding e, then the
            # lowest resulting rank load.
            best = None
            for s, x in enumerate(row):
                if d[x] < 0 and cur[x] > cnt[x]:
                    after = rank_load[s // S] + w[e] / cnt[e] - w[x] / cur[x]
                    key = ((s // S) not in on_rank, -after)
                    if best is None or key > best[0]:
                        best = (key, s)
            if best is None:
                break
            s = best[1]
            x = row[s]
            r = s // S
            rank_load[r] += w[e] / cnt[e] - w[x] / cur[x]
            cur[x] -= 1
            cur[e] += 1
            row[s] = e
            changes[layer] += 1
        out[layer] = torch.tensor(row)
    return out, changes


def refined_phy2log(
    load: torch.Tensor, num_ranks: int, num_redundant: int,
    previous: torch.Tensor | None = None, max_moves: int | None = None, tolerance: float = TOLERANCE,
) -> torch.Tensor:
    """``load [L, E]`` -> ``phy2log [L, E + R]`` (see the module docstring). With ``previous``,
    a warm start within ``tolerance`` (relative max rank load) of the fresh solution wins."""
    load = load.to(torch.float64)
    num_layers, num_experts = load.shape
    num_physical = num_experts + num_redundant
    cap = max(num_ranks, -(-num_physical // num_experts))
    count = replicate_capped(load, num_physical, cap)
    fresh = greedy_pack_distinct(load, count, num_ranks)
    fresh, _ = swap_search(fresh, load, count.to(torch.float64), num_ranks)
    if previous is None:
        return fresh
    fresh_max = max_rank_load(fresh, load, num_ranks) * (1 + tolerance)
    budget = None if max_moves is None else [max_moves] * num_layers
    warm, changes = warm_start(previous, load, count, num_ranks, budget)
    warm_count = torch.zeros_like(load).scatter_add_(1, warm, torch.ones_like(warm, dtype=load.dtype))
    swap_budget = None if max_moves is None else (max_moves - changes)
    warm, _ = swap_search(warm, load, warm_count, num_ranks, target=fresh_max, budget=swap_budget)
    if max_moves is not None:
        return warm
    warm_max = max_rank_load(warm, load, num_ranks)
    aligned = map_to_previous(fresh, previous, num_ranks, num_experts)
    use_warm = warm_max <= fresh_max * (1 + _REL) + 1e-12
    return torch.where(use_warm.unsqueeze(1), warm, aligned)
