"""Replica counts chosen together with the packing: a search on the target max rank load.

Greedy replication (DeepSeek's, and ``refined``'s first step) fixes the replica counts before
packing: each extra slot goes to the expert with the highest load per replica. That minimises the
heaviest *replica*, not the heaviest *rank*: with few slots per rank, every rank must still take
exactly ``S`` replicas, and a rank that holds a big replica also holds ``S - 1`` others. The known
toy (loads 600, 560, 120, 120, 20, 10, 10, 10 on 8 ranks of 2 slots) shows it: greedy counts
(4, 4, 2, 2, 1, 1, 1, 1) cannot go below 200, counts (4, 3, 1, 3, 1, 1, 1, 2) reach 196.7.

``pack_to_target`` decides counts while packing, for a given target ``T``: experts heaviest first,
each takes the fewest replicas ``c`` such that its ``c`` replicas of ``w / c`` fit (``<= T``) on
the ``c`` lightest ranks that still have a free slot, one replica per rank (worst fit
decreasing, splitting as needed). ``search_counts`` bisects ``T`` between the lower bound and
the best max rank load found so far, many targets per layer at once.
"""

from __future__ import annotations

import numpy as np

# Targets tried per layer and pass; each pass narrows the interval around the best feasible one.
TARGETS_PER_PASS = 4
MAX_PASSES = 4
# Stop narrowing once the interval is this small relative to the target.
RESOLUTION = 1e-3
# A layer where no target of a pass fits goes on searching only while its interval is this wide.
WIDE_GAP = 0.05


def pack_to_target(load: np.ndarray, target: np.ndarray, num_ranks: int,
                   slots_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Worst fit decreasing with splitting, one row per problem.

    ``load [B, E]`` (>= 0), ``target [B]`` -> ``(phy2log [B, P], feasible [B])`` with
    ``P = num_ranks * slots_per_rank >= E``. A feasible row holds every expert at least once, no
    expert twice on one rank, and no rank above its target; an infeasible row's ``phy2log`` is
    meaningless (partly -1).
    """
    B, E = load.shape
    G, S = num_ranks, slots_per_rank
    P = G * S
    order = np.argsort(-load, axis=1, kind="stable")  # experts, heaviest first
    w_sorted = np.take_along_axis(load, order, 1)
    # key: a rank's load while it has a free slot, +inf once full (flat views for updates)
    key = np.zeros((B, G))
    key_f = key.reshape(-1)
    fill = np.zeros(B * G, dtype=np.int64)
    out = np.full(B * P, -1, dtype=np.int64)
    ok = np.ones(B, dtype=bool)
    used = np.zeros(B, dtype=np.int64)
    reps = np.arange(1, G + 1)  # candidate replica counts c = 1..G
    tgt = target * (1 + 1e-12) + 1e-12
    rows = np.arange(B)
    row_g, row_p = rows * G, rows * P
    # Early failure: every rank ends at most at the target, so a row whose full ranks left more
    # room under it (``lost``) than the whole row has (``G * tgt - sum(load)``) will fail later
    # anyway (the margin covers rounding: only clearly infeasible rows stop early).
    spare = G * tgt - load.sum(1) + 1e-9 * G * np.abs(tgt)
    lost = np.zeros(B)
    for j in range(E):
        if not ok.any():
            break
        experts_after = E - j - 1
        slots_left = P - used
        # Every later expert needs a slot, and can take at most G (one per rank).
        c_lo1 = slots_left - experts_after * G <= 1
        w = w_sorted[:, j]
        g1 = key.argmin(1)
        fr = row_g + g1
        # Most experts fit whole on the lightest open rank: no sort for those rows.
        single = (key_f[fr] + w <= tgt) & c_lo1 & ok
        if single.all():
            f = fill[fr]
            out[row_p + g1 * S + f] = order[:, j]
            fill[fr] = f + 1
            key_f[fr] += w
            used += 1
        else:
            multi = np.flatnonzero(~single & ok)
            r = np.flatnonzero(single)
            g = g1[r]
            add = w[r]
            if multi.size:
                c_hi = np.minimum(G, slots_left[multi] - experts_after)
                c_lo = np.maximum(1, slots_left[multi] - experts_after * G)
                by_load = np.argsort(key[multi], axis=1, kind="stable")
                kth = np.take_along_axis(key[multi], by_load, 1)  # c-th lightest: kth[c - 1]
                wm = w[multi]
                fits = (kth + wm[:, None] / reps <= tgt[multi, None]) & (
                    reps >= c_lo[:, None]) & (reps <= c_hi[:, None])
                found = fits.any(1)
                ok[multi[~found]] = False
                cm = fits.argmax(1) + 1  # the fewest replicas that fit
                used[multi[found]] += cm[found]
                mr, pos = np.nonzero((reps <= cm[:, None]) & found[:, None])
                r = np.concatenate([r, multi[mr]])
                g = np.concatenate([g, by_load[mr, pos]])
                add = np.concatenate([add, (wm / cm)[mr]])
            used[r[: r.size - (0 if not multi.size else mr.size)]] += 1
            fr = row_g[r] + g
            f = fill[fr]
            out[row_p[r] + g * S + f] = order[r, j]
            fill[fr] = f + 1
            key_f[fr] += add
        full = fr[f + 1 >= S]
        if full.size:
            lost += np.bincount(full // G, weights=tgt[full // G] - key_f[full], minlength=B)
            key_f[full] = np.inf
            ok &= lost <= spare
    return out.reshape(B, P), ok


def search_counts(load: np.ndarray, lower: np.ndarray, upper: np.ndarray, num_ranks: int,
                  slots_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Bisect the target per layer. ``load [L, E]``, ``lower [L]`` (no placement goes below),
    ``upper [L]`` (the best max rank load known) -> ``(phy2log [L, P], max rank load [L])``; rows
    where no target below ``upper`` was feasible hold ``phy2log`` -1 and max ``inf``."""
    L, E = load.shape
    K = TARGETS_PER_PASS
    P = num_ranks * slots_per_rank
    best = np.full((L, P), -1, dtype=np.int64)
    best_max = np.full(L, np.inf)
    lo, hi = lower.astype(np.float64).copy(), upper.astype(np.float64).copy()
    frac = np.arange(K) / K  # targets lo + (hi - lo) * k / K, k < K (hi is known already)
    for _ in range(MAX_PASSES):
        rows = np.flatnonzero(hi - lo > RESOLUTION * hi)
        if rows.size == 0:
            break
        targets = lo[rows, None] + (hi - lo)[rows, None] * frac  # [n, K]
        p2l, ok = pack_to_target(np.repeat(load[rows], K, 0), targets.ravel(), num_ranks,
                                 slots_per_rank)
        ok = ok.reshape(-1, K)
        first = np.where(ok.any(1), ok.argmax(1), K)  # smallest feasible target's index
        hit = first < K
        # Infeasible below the first feasible target: it becomes the new low end.
        new_lo = targets[np.arange(rows.size), np.maximum(first - 1, 0)]
        lo[rows] = np.where(first > 0, np.where(hit, new_lo, targets[:, -1]), lo[rows])
        # No target fits: only a wide gap is worth searching its last quarter (time).
        give_up = rows[~hit & (hi[rows] < lo[rows] * (1 + WIDE_GAP))]
        lo[give_up] = hi[give_up]
        for i in np.flatnonzero(hit):  # few rows: the loop is cheap
            layer, k = rows[i], first[i]
            cand = p2l[i * K + k]
            m = _max_load(cand, load[layer], num_ranks)
            if m < best_max[layer]:
                best[layer], best_max[layer] = cand, m
            hi[layer] = min(hi[layer], m)
    return best, best_max


def _max_load(phy2log: np.ndarray, load: np.ndarray, num_ranks: int) -> float:
    count = np.bincount(phy2log, minlength=load.size)
    return float((load / np.maximum(count, 1))[phy2log].reshape(num_ranks, -1).sum(1).max())
