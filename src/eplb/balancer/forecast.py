"""Forecast the next interval's load from the recent steps: choose the fit per layer by validation.

A rebalance fits a placement on an estimate of the load and then serves it on traffic it has not
seen. The flat window sum is the best estimate of stationary traffic (least routing noise), but
under drift or after a load shift it lags: its centre of mass is ``K / 2`` steps in the past.
Recency-weighted sums (weights ``0.5 ** (age / half_life)``) follow the traffic but carry more
noise. Which one forecasts better depends on the traffic, so it is decided from the traffic
itself, per layer, as in time-series cross-validation:

1. at each origin ``o`` (``ORIGINS``: half-way and three quarters into the history of ``K``
   steps), compute every candidate on the steps before ``o`` and place it (all origins,
   candidates and layers in one batched call of a cheap greedy packing: it ranks estimates);
2. score each placement on the next ``V = HORIZON * K`` steps one by one (per-step
   balancedness); pool the per-step gains over the flat sum across the origins;
3. a candidate replaces the flat sum only when its mean gain exceeds ``Z`` standard errors (the
   flat sum is the default: a recency fit must prove itself on unseen steps, not win by noise);
   among those that pass, the largest mean gain wins;
4. the chosen candidate is recomputed on the whole history (the same half-life in steps), and
   the real placement is fit on it.

Why two origins: with one origin at the end, a recency fit is judged only where the recent
steps resemble what follows. Bursty traffic (a burst of another workload in the last 10 of
every 50 steps) defeats that: validated at ``3K/4`` (fit on normal steps, scored on normal steps
and a burst) a short half-life wins, but refit at ``K`` it is fit mostly on the burst the window
ends with, and loses to the flat sum on the next interval (bench/balancer.py: -6.6 points on
Qwen3-30B-A3B EP 8 R 8). There the origin at ``K/2`` follows a burst, as the refit does,
and the recency fit loses where it would lose after the refit.

Nothing here changes when a rebalance happens: it only changes what a rebalance fits.
"""

from __future__ import annotations

from typing import Callable

import torch

# Half-lives of the recency-weighted candidates, as fractions of the history length K: from a
# mild tilt (K/2) to nearly "the last K/4 steps only" (K/8: after a shift in the window's middle
# the old traffic keeps ~1/16 of the weight).
HALF_LIVES = (0.5, 0.25, 0.125)
# Validation origins (fractions of K): each candidate is fit on the steps before the origin and
# scored on the next HORIZON * K steps. Several origins, so that a recency fit is judged both
# where the recent steps resemble what follows and where they do not (a burst at the end).
ORIGINS = (0.5, 0.75)
HORIZON = 0.25
# Standard errors by which a candidate must beat the flat sum on the held-out steps.
Z = 2.0
# Below this many steps (fit or scored) the comparison means little: keep the flat sum.
MIN_STEPS = 8


def recency_weights(num_steps: int, half_life: float) -> torch.Tensor:
    """``[num_steps]`` float64, oldest first: ``0.5 ** (age / half_life)`` (newest has weight 1);
    ``half_life = inf`` gives the flat sum's weights (all 1)."""
    age = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
    return torch.pow(0.5, age / half_life)


def candidate_weights(num_steps: int, half_lives: tuple[float, ...]) -> torch.Tensor:
    """``[C, num_steps]``: the flat sum first, then one recency weighting per half-life (steps)."""
    rows = [recency_weights(num_steps, h) for h in (float("inf"), *half_lives)]
    return torch.stack(rows)


def weighted_loads(history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``history [K, L, E]``, ``weights [C, K]`` -> ``[C, L, E]`` float64 weighted sums."""
    return torch.einsum("ck,kle->cle", weights, history.to(torch.float64))


def choose_fit(
    history: torch.Tensor, fit: Callable[[torch.Tensor], torch.Tensor], num_ranks: int,
    half_life_fractions: tuple[float, ...] = HALF_LIVES, origins: tuple[float, ...] = ORIGINS,
    horizon: float = HORIZON, z: float = Z,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the estimate that forecast the recent steps best (rolling origin).

    ``history [K, L, E]`` (recent per-step loads, oldest first); ``fit(load [N, E]) -> phy2log
    [N, P]`` places ``N`` independent layers at once on ``num_ranks`` ranks. For each origin
    ``o = round(f * K)`` (``f`` in ``origins``) every candidate is computed on steps ``[0, o)``
    and scored on ``[o, o + V)``, ``V = round(horizon * K)``. Returns ``(choice [L]`` int64, 0 =
    the flat sum, ``c`` = the ``c``-th half-life; ``weights [C, K]`` the candidates' step weights
    on the whole history``)``. With too few steps (an origin or a horizon below ``MIN_STEPS``),
    every layer keeps the flat sum."""
    num_steps, num_layers, num_experts = history.shape
    half_lives = tuple(f * num_steps for f in half_life_fractions)
    weights = candidate_weights(num_steps, half_lives)
    choice = torch.zeros(num_layers, dtype=torch.long)
    held = int(round(num_steps * horizon))
    cuts = sorted({int(round(f * num_steps)) for f in origins})
    cuts = [o for o in cuts if o >= MIN_STEPS and o + held <= num_steps]
    if held < MIN_STEPS or not cuts or not half_lives:
        return choice, weights
    num_cands = len(half_lives) + 1
    # Every origin's candidates in one batched call: row (i * C + c) * L + l.
    cands = torch.cat([weighted_loads(history[:o], candidate_weights(o, half_lives)) for o in cuts])
    placed = fit(cands.reshape(len(cuts) * num_cands * num_layers, num_experts))
    placed = placed.reshape(len(cuts), num_cands, num_layers, -1)
    diffs = []
    for i, o in enumerate(cuts):
        score = step_balancedness(history[o: o + held], placed[i], num_ranks)  # [V, C, L]
        diffs.append(score[:, 1:] - score[:, :1])  # gain over the flat sum, step by step
    diff = torch.cat(diffs, 0)  # [n * V, C - 1, L]
    mean = diff.mean(0)
    se = diff.std(0, unbiased=True) / diff.shape[0] ** 0.5
    passes = mean > z * se  # a significant gain (se 0 with mean 0 does not pass)
    gain = torch.where(passes, mean, torch.full_like(mean, -torch.inf))
    best = gain.argmax(0)  # [L]
    won = torch.isfinite(gain.max(0).values)
    choice[won] = best[won] + 1
    return choice, weights


def step_balancedness(load: torch.Tensor, phy2log: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """``load [V, L, E]``, ``phy2log [C, L, P]`` (C placements of the L layers) -> ``[V, C, L]``
    per-step balancedness, as ``stats.balancedness`` (a layer without load counts as 1) but
    without building a validated ``Placement`` per candidate: they are many and only scored."""
    num_cands, num_layers, _ = phy2log.shape
    steps, _, num_experts = load.shape
    flat = (phy2log + torch.arange(num_layers)[None, :, None] * num_experts).reshape(num_cands, -1)
    count = torch.zeros(num_cands, num_layers * num_experts, dtype=torch.float64)
    count.scatter_add_(1, flat, torch.ones(flat.shape, dtype=torch.float64))
    per_rep = load.to(torch.float64).reshape(steps, 1, -1) / count.clamp_min(1)  # [V, C, L*E]
    slot = per_rep.gather(2, flat.unsqueeze(0).expand(steps, -1, -1))  # [V, C, L*P]
    ranks = slot.reshape(steps, num_cands, num_layers, num_ranks, -1).sum(-1)  # [V, C, L, G]
    peak = ranks.amax(-1)
    return torch.where(peak > 0, ranks.mean(-1) / peak.clamp_min(1e-300), torch.ones_like(peak))


def forecast_load(load: torch.Tensor, history: torch.Tensor, choice: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``load [L, E]`` (the estimator's total, kept where ``choice`` is 0), ``history [K, L, E]``,
    ``choice [L]``, ``weights [C, K]`` -> ``(estimate [L, E]`` float64, ``step_weights [K, L]``:
    how much each history step counts for each layer's estimate, for judging placements on it)."""
    estimate = load.to(torch.float64).clone()
    step_w = weights[choice].T.contiguous()  # [K, L]
    pick = torch.nonzero(choice).flatten()
    if pick.numel():
        w = weights[choice[pick]]  # [n, K]
        estimate[pick] = torch.einsum("nk,kne->ne", w, history[:, pick].to(torch.float64))
    return estimate, step_w
