"""Our policy: greedy + swap local search toward the lower bound, migration-aware.

All steps run on all layers at once (arrays ``[L, ...]``; numpy inside, where the many small
steps cost far less than torch ops).

1. Replicate: the extra slots go, one at a time, to the expert with the highest load per replica,
   but no expert gets more replicas than there are ranks (a second copy on one rank adds nothing).
2. Pack (fresh): replicas heaviest first into the lightest rank with room that does not already
   hold that expert; then swap local search: repeatedly swap one replica of the heaviest rank with
   one replica on one of the lightest ranks, the swap that lowers the pair's max the most, until
   none helps or the layer reaches the lower bound. A layer still more than ``SECOND_TRY`` above
   the bound also packs DeepSeek's uncapped replication (second copies on a rank allowed) the same
   way and keeps it only if its max rank load is strictly lower. A layer still more than
   ``SECOND_TRY`` above the bound then searches replica counts together with the packing
   (``counts.search_counts``) and keeps the result when its max is ``COUNT_GAIN`` lower.
3. With ``previous`` (migration-aware): the fresh packing again, but a rank that held the
   replica's expert counts ``STICKY`` (a fraction of the mean rank load) lighter, so among ranks
   about as light the replica stays where it was; then the same swap search. A layer whose
   previous placement's rank loads (in descending order) are each within ``TOLERANCE`` of the
   fresh placement's keeps it; a layer whose result is more than ``TOLERANCE`` above the fresh
   max takes the fresh placement. Packs are
   then mapped onto ranks by greedy max overlap with ``previous`` and each rank's slots aligned
   so that experts it already holds stay in their slots. (An earlier warm start swapped from
   the previous placement until the fresh load profile was matched: in bench/balancer.py's
   next-interval replay it moved 0.22 of greedy's copies against 0.41 but gained +0.12 points
   over greedy on average against +0.26; it remains for ``max_moves``.)
4. ``max_moves`` caps the copies a rebalance moves per layer: starting from ``previous``,
   replica-count changes go hottest first, then swaps (best gain first) toward the fresh
   placement's load profile.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.balancer.counts import search_counts
from eplb.balancer.swap import REL as _REL
from eplb.balancer.swap import bincount2d as _bincount2d
from eplb.balancer.swap import swap_search

# A warm start may be this much (relative max rank load on the window) worse than a fresh
# solution: the window's own routing noise is larger, and every avoided move is real.
TOLERANCE = 0.005
# A layer whose first packing ends this far above the bound also tries the second one.
SECOND_TRY = 0.01
# Migration-aware packing: a rank that held an expert counts this fraction of the mean rank
# load lighter for that expert's replicas (bench/balancer.py: 0.1 moved ~40% of greedy's copies).
STICKY = 0.1
# A layer takes the counts searched with the packing only when its max rank load is this much
# lower than with greedy counts: at equal fit, greedy's spare replicas on hot experts hold up
# better on the next steps' traffic.
COUNT_GAIN = 0.002


def replicate_capped(load: np.ndarray, num_physical: int, cap: int) -> np.ndarray:
    """``load [L, E]`` -> ``count [L, E]``, sum ``num_physical`` per layer, each in ``[1, cap]``."""
    num_layers, num_experts = load.shape
    count = np.ones((num_layers, num_experts))
    rows = np.arange(num_layers)
    # Per-replica load, -inf once at the cap; only the changed entry is recomputed per step.
    score = np.where(count < cap, load / count, -np.inf)
    for _ in range(num_physical - num_experts):
        j = score.argmax(1)
        c = count[rows, j] + 1
        count[rows, j] = c
        score[rows, j] = np.where(c < cap, load[rows, j] / c, -np.inf)
    return count.astype(np.int64)


def _expand(count: np.ndarray) -> np.ndarray:
    """``count [L, E]`` (equal row sums P) -> ``[L, P]`` expert ids, ascending."""
    num_layers, num_experts = count.shape
    ids = np.tile(np.arange(num_experts), num_layers)
    return np.repeat(ids, count.ravel()).reshape(num_layers, -1)


def greedy_pack_distinct(
    load: np.ndarray, count: np.ndarray, num_ranks: int, distinct: bool = True,
    sticky: np.ndarray | None = None, bonus: np.ndarray | None = None,
) -> np.ndarray:
    """Heaviest replica first into the lightest non-full rank not holding its expert (any
    non-full rank when ``distinct`` is False). Returns ``phy2log [L, P]`` (rank g owns slots
    ``[g*S, (g+1)*S)``). With ``sticky [L, G, E]`` (bool: rank g held expert e before) a rank
    that held the replica's expert counts ``bonus [L]`` lighter: among ranks about as light,
    the replica stays where it was, so the packing keeps greedy's structure and moves less."""
    num_layers = load.shape[0]
    G = num_ranks
    items = _expand(count)  # [L, P]
    num_physical = items.shape[1]
    S = num_physical // G
    rows = np.arange(num_layers)[:, None]
    item_w = (load / count)[rows, items]
    # Stable sort keeps replicas of one expert adjacent (items come grouped by expert).
    order = np.argsort(-item_w, axis=1, kind="stable")
    items = np.take_along_axis(items, order, 1)
    item_w = np.take_along_axis(item_w, order, 1)
    out = np.empty(num_layers * num_physical, dtype=np.int64)
    # Flat state, updated through precomputed flat offsets (the loop is numpy-call bound).
    # key: a rank's load, +inf once full; pen: +inf on ranks holding the current expert.
    key = np.zeros((num_layers, G))
    pen = np.zeros((num_layers, G))
    fill = np.zeros(num_layers * G, dtype=np.int64)
    key_f, pen_f = key.reshape(-1), pen.reshape(-1)
    row_g = rows[:, 0] * G
    row_p = rows[:, 0] * num_physical
    start = 0
    if sticky is None and num_physical >= G and (item_w[:, :G] > 0).all():
        # The G heaviest replicas go to ranks 0..G-1 in order: each lands on the first still
        # empty rank (every used rank already has a positive load).
        out.reshape(num_layers, G, S)[:, :, 0] = items[:, :G]
        key[:] = item_w[:, :G]
        fill[:] = 1
        if S == 1:
            key[:] = np.inf
        start = G
    prev = items[:, start - 1] if start else np.full(num_layers, -1)
    # Replica j can only find every open rank holding its expert when its earlier replicas
    # (k of them) are at least as many as the ranks still open (>= ceil((P - j) / S)).
    if distinct:
        new_run = np.ones_like(items, dtype=bool)
        new_run[:, 1:] = items[:, 1:] != items[:, :-1]
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(num_physical), 0), axis=1)
        k_before = np.arange(num_physical) - run_start
        may_stick = (k_before >= -(-(num_physical - np.arange(num_physical)) // S)).any(0)
    else:
        may_stick = np.zeros(num_physical, dtype=bool)
    if distinct and start:
        pen[:] = np.where(items[:, :G] == prev[:, None], np.inf, 0.0)
    for j in range(start, num_physical):
        e = items[:, j]
        if distinct:
            pen[e != prev] = 0.0
        cand = key + pen
        if sticky is not None:
            cand = cand - bonus[:, None] * sticky[rows[:, 0], :, e]
        r = cand.argmin(1)
        fr = row_g + r
        if may_stick[j] and np.isinf(cand.reshape(-1)[fr]).any():
            # Only when every open rank already holds this expert do we accept a second copy.
            stuck = np.isinf(cand.reshape(-1)[fr])
            r = np.where(stuck, key.argmin(1), r)
            fr = row_g + r
        f = fill[fr]
        out[row_p + r * S + f] = e
        fill[fr] = f + 1
        key_f[fr] += item_w[:, j]
        full = fr[f + 1 >= S]
        key_f[full] = np.inf
        if distinct:
            pen_f[fr] = np.inf
        prev = e
    return out.reshape(num_layers, num_physical)


def rank_loads_np(phy2log: np.ndarray, load: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L, G]``: each rank's load, each expert's load split evenly over its replicas."""
    rows = np.arange(phy2log.shape[0])[:, None]
    count = _bincount2d(phy2log, load.shape[1])
    slot_w = (load / np.maximum(count, 1))[rows, phy2log]
    return slot_w.reshape(phy2log.shape[0], num_ranks, -1).sum(-1)


def max_rank_load(phy2log: np.ndarray, load: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[L]``: the heaviest rank's load."""
    return rank_loads_np(phy2log, load, num_ranks).max(1)


def warm_start(
    previous: np.ndarray, load: np.ndarray, count: np.ndarray, num_ranks: int,
    budget: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Change ``previous [L, P]`` so replica counts become ``count`` (or as many changes as
    ``budget`` allows per layer, hottest replica first). Each change re-uses one slot of an expert
    with surplus replicas, preferring ranks without the incoming expert, then the lowest
    resulting rank load. Returns ``(phy2log, changes per layer [L])``."""
    row = previous.copy()
    num_layers, num_physical = row.shape
    num_experts = load.shape[1]
    S = num_physical // num_ranks
    rows = np.arange(num_layers)
    cur = _bincount2d(row, num_experts)
    deficit = np.maximum(count - cur, 0)
    changes = np.zeros(num_layers, dtype=np.int64)
    if not deficit.any():
        return row, changes
    # Incoming replicas per layer, hottest load per replica first, padded with -1.
    want = _expand_padded(deficit)
    want_w = np.where(want >= 0, (load / np.maximum(count, 1))[rows[:, None], np.maximum(want, 0)], -1.0)
    order = np.argsort(-want_w, axis=1, kind="stable")
    want = np.take_along_axis(want, order, 1)
    if budget is not None:
        want = want[:, :budget]
    rank_of = np.arange(num_physical) // S
    per_rep_cur = load / np.maximum(cur, 1)
    rank_load = per_rep_cur[rows[:, None], row].reshape(num_layers, num_ranks, S).sum(-1)
    for k in range(want.shape[1]):
        e = want[:, k]
        act = e >= 0
        if not act.any():
            break
        e0 = np.maximum(e, 0)
        holds_e = (row == e0[:, None]).reshape(num_layers, num_ranks, S).any(-1)  # [L, G]
        cur_at = cur[rows[:, None], row]
        surplus = cur_at > count[rows[:, None], row]  # [L, P] slots we may take
        gain = load[rows, e0] / np.maximum(count[rows, e0], 1)
        after = rank_load[:, rank_of] + gain[:, None] - load[rows[:, None], row] / np.maximum(cur_at, 1)
        big = np.abs(after).max() + 1.0
        score = np.where(surplus, after + np.where(holds_e[:, rank_of], 2 * big, 0.0), np.inf)
        s = score.argmin(1)
        act &= np.isfinite(score[rows, s])
        li, s, e = rows[act], s[act], e[act]
        x = row[li, s]
        r = rank_of[s]
        rank_load[li, r] += gain[act] - load[li, x] / np.maximum(cur[li, x], 1)
        cur[li, x] -= 1
        cur[li, e] += 1
        row[li, s] = e
        changes[li] += 1
    return row, changes


def _expand_padded(count: np.ndarray) -> np.ndarray:
    """``count [L, E]`` -> ``[L, max row sum]`` expert ids (each ``count`` times), -1 padded."""
    num_layers, num_experts = count.shape
    width = int(count.sum(1).max())
    out = np.full((num_layers, width), -1, dtype=np.int64)
    for layer in np.flatnonzero(count.sum(1)):
        ids = np.repeat(np.arange(num_experts), count[layer])
        out[layer, : ids.size] = ids
    return out


def map_to_previous(new: torch.Tensor, old: torch.Tensor, num_ranks: int, num_experts: int) -> torch.Tensor:
    """Relabel the packs (ranks) of ``new [L, P]`` to maximise overlap with ``old [L, P]`` (greedy
    on the overlap matrix), then align slots inside each rank so kept experts keep their slots."""
    num_layers, num_physical = new.shape
    S = num_physical // num_ranks
    rank_of = np.arange(num_physical) // S
    rows = np.arange(num_layers)

    def holds(p2l: np.ndarray) -> torch.Tensor:
        h = _bincount2d(rank_of * num_experts + p2l, num_ranks * num_experts)
        return torch.from_numpy(h.astype(np.float32)).view(num_layers, num_ranks, num_experts)

    new_np, old_np = new.numpy(), old.numpy()
    # torch.bmm: numpy's stacked matmul on a transposed operand falls back to a slow loop.
    overlap = torch.bmm(holds(new_np), holds(old_np).transpose(1, 2)).numpy()  # [L, pack, rank]
    rank_to_pack = np.empty((num_layers, num_ranks), dtype=np.int64)
    for _ in range(num_ranks):
        k = overlap.reshape(num_layers, -1).argmax(1)
        p, r = k // num_ranks, k % num_ranks
        rank_to_pack[rows, r] = p
        overlap[rows, p, :] = -1.0
        overlap[rows, :, r] = -1.0
    packed = np.take_along_axis(new_np.reshape(num_layers, num_ranks, S), rank_to_pack[:, :, None], 1)
    aligned = align_slots(torch.from_numpy(packed.reshape(-1, S)), old.reshape(-1, S))
    return aligned.view(num_layers, num_physical)


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


def max_load_bound(
    load: np.ndarray, num_physical: int, num_ranks: int, uncapped: np.ndarray | None = None
) -> np.ndarray:
    """``[L]``: no placement's max rank load is below this (see ``stats.balancedness_upper_bound``).
    ``uncapped``: ``replicate_capped(load, num_physical, num_physical)`` if already at hand."""
    if uncapped is None:
        uncapped = replicate_capped(load, num_physical, num_physical)
    per_rep = (load / uncapped).max(1)
    return np.maximum(per_rep, load.sum(1) / num_ranks)


def fresh_placement(w: np.ndarray, num_ranks: int, num_redundant: int) -> np.ndarray:
    """Best of three packings per layer, each refined by swaps: capped replication packed with
    distinct experts per rank; for layers that one leaves more than ``SECOND_TRY`` above the
    bound, DeepSeek's uncapped replication packed without that rule (kept only when strictly
    better), then replica counts searched with the packing (``counts.search_counts``, kept only
    when ``COUNT_GAIN`` better)."""
    num_layers, num_experts = w.shape
    num_physical = num_experts + num_redundant
    cap = max(num_ranks, -(-num_physical // num_experts))
    uncapped = replicate_capped(w, num_physical, num_physical)
    bound = max_load_bound(w, num_physical, num_ranks, uncapped)
    # The cap only binds where some expert got more replicas than it allows.
    count = uncapped if uncapped.max() <= cap else replicate_capped(w, num_physical, cap)
    best, _ = swap_search(greedy_pack_distinct(w, count, num_ranks), w, num_ranks, target=bound)
    best_max = max_rank_load(best, w, num_ranks)
    if not np.isfinite(SECOND_TRY):
        return best
    # Every layer not at the bound also packs DeepSeek's uncapped replication without the
    # one-copy-per-rank rule (greedy's own packing), so refined is never less balanced than
    # greedy on the fitted load; only layers more than SECOND_TRY above the bound swap-search it.
    open_rows = np.flatnonzero(best_max > bound * (1 + _REL))
    if open_rows.size:
        wo = w[open_rows]
        other = greedy_pack_distinct(wo, uncapped[open_rows], num_ranks, distinct=False)
        far = np.flatnonzero(best_max[open_rows] > bound[open_rows] * (1 + SECOND_TRY))
        if far.size:
            other[far], _ = swap_search(other[far], wo[far], num_ranks, target=bound[open_rows[far]])
        other_max = max_rank_load(other, wo, num_ranks)
        better = other_max < best_max[open_rows] * (1 - _REL)
        best[open_rows[better]] = other[better]
        best_max[open_rows[better]] = other_max[better]
    # Greedy's replica counts are the limit on layers still open: choose counts with the packing.
    open_rows = np.flatnonzero(best_max > bound * (1 + SECOND_TRY))
    if open_rows.size:
        cand, cand_max = search_counts(w[open_rows], bound[open_rows], best_max[open_rows],
                                       num_ranks, num_physical // num_ranks)
        hit = np.flatnonzero(np.isfinite(cand_max))
        if hit.size:
            rows, wr = open_rows[hit], w[open_rows[hit]]
            cand, _ = swap_search(cand[hit], wr, num_ranks, target=bound[rows])
            better = max_rank_load(cand, wr, num_ranks) < best_max[rows] * (1 - COUNT_GAIN)
            best[rows[better]] = cand[better]
    return best


def _sticky_fresh(w: np.ndarray, fresh: np.ndarray, count: np.ndarray, prev: np.ndarray,
                  num_ranks: int, tolerance: float) -> np.ndarray:
    """Step 3 of the module docstring: ``w [L, E]``, ``fresh``/``prev`` ``[L, P]``, the fresh
    replica counts ``count [L, E]`` -> ``phy2log [L, P]`` aligned with ``prev``."""
    num_layers, num_physical = prev.shape
    num_experts = w.shape[1]
    S = num_physical // num_ranks
    rank_of = np.arange(num_physical) // S
    sticky = _bincount2d(rank_of * num_experts + prev, num_ranks * num_experts)
    sticky = sticky.reshape(num_layers, num_ranks, num_experts) > 0
    bonus = STICKY * w.sum(1) / num_ranks
    bound = max_load_bound(w, num_physical, num_ranks)
    sp = greedy_pack_distinct(w, count, num_ranks, sticky=sticky, bonus=bonus)
    sp, _ = swap_search(sp, w, num_ranks, target=bound)
    worse = max_rank_load(sp, w, num_ranks) > max_rank_load(fresh, w, num_ranks) * (1 + tolerance) + 1e-12
    sp[worse] = fresh[worse]
    out = map_to_previous(torch.from_numpy(sp), torch.from_numpy(prev), num_ranks, num_experts).numpy()
    # A layer whose previous placement already matches the fresh load profile (each rank load,
    # in descending order, within the tolerance) keeps it: nothing to gain, nothing moves.
    profile = -np.sort(-rank_loads_np(fresh, w, num_ranks), axis=1) * (1 + tolerance) + 1e-12
    keep = (-np.sort(-rank_loads_np(prev, w, num_ranks), axis=1) <= profile).all(1)
    out[keep] = prev[keep]
    return out


def refined_phy2log(
    load: torch.Tensor, num_ranks: int, num_redundant: int,
    previous: torch.Tensor | None = None, max_moves: int | None = None, tolerance: float = TOLERANCE,
) -> torch.Tensor:
    """``load [L, E]`` -> ``phy2log [L, E + R]`` (see the module docstring). With ``previous``,
    a layer whose migration-aware placement is more than ``tolerance`` (relative max rank load)
    above the fresh one takes the fresh placement."""
    w = load.detach().cpu().double().numpy()
    num_layers, num_experts = w.shape
    fresh = fresh_placement(w, num_ranks, num_redundant)
    if previous is None:
        return torch.from_numpy(fresh)
    prev = previous.detach().cpu().numpy().astype(np.int64)
    count = _bincount2d(fresh, num_experts)  # both paths aim at the fresh replica counts
    if max_moves is None:
        return torch.from_numpy(_sticky_fresh(w, fresh, count, prev, num_ranks, tolerance))
    # Capped: change counts and swap from previous, move by move, toward the fresh placement's
    # whole load profile (ranks just under the max become the max on the next, noisier steps).
    fresh_loads = rank_loads_np(fresh, w, num_ranks)
    warm, changes = warm_start(prev, w, count, num_ranks, max_moves)
    levels = -np.sort(-fresh_loads, axis=1) * (1 + tolerance)
    warm, _ = swap_search(warm, w, num_ranks, budget=max_moves - changes, levels=levels)
    return torch.from_numpy(warm)


def quick_placement(load: torch.Tensor, num_ranks: int, num_redundant: int) -> torch.Tensor:
    """``load [L, E]`` -> ``phy2log [L, E + R]``: step 1 and the greedy packing of step 2 only
    (no swap search, no second try, no count search; about 7x cheaper than
    ``fresh_placement``). For ranking load estimates (``eplb.balancer.forecast``), not for
    serving."""
    w = load.detach().cpu().double().numpy()
    num_physical = w.shape[1] + num_redundant
    cap = max(num_ranks, -(-num_physical // w.shape[1]))
    return torch.from_numpy(greedy_pack_distinct(w, replicate_capped(w, num_physical, cap), num_ranks))
