"""Replica counts chosen with the packing (eplb.balancer.counts)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.counts import pack_to_target, search_counts
from eplb.balancer.policies import get_policy
from eplb.balancer.refined import max_load_bound
from eplb.balancer.stats import rank_loads

TOY = [600, 560, 120, 120, 20, 10, 10, 10]


def test_toy_reaches_the_optimum_greedy_counts_cannot():
    load = torch.tensor([TOY])
    greedy = get_policy("deepseek")(load, 8, 8)
    ours = get_policy("refined")(load, 8, 8)
    assert rank_loads(load, greedy).max() > 200  # greedy's replica counts are the limit
    assert rank_loads(load, ours).max() <= 197  # the optimum is 590 / 3 = 196.67
    ours.validate()
    assert (ours.num_colocated() == 0).all()


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 3))
    ranks = draw(st.integers(1, 10))
    experts = draw(st.integers(1, 3 * ranks))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    skew = draw(st.sampled_from([0.0, 1.0, 1.5, 2.5]))
    load = rng.poisson(500 / (rng.permutation(experts) + 1.0) ** skew, size=(layers, experts))
    return load.astype(float), ranks, per_rank


@settings(max_examples=80, deadline=None)
@given(prob=problems(), slack=st.floats(0.0, 0.5))
def test_pack_to_target_feasible_rows_hold_every_invariant(prob, slack):
    load, ranks, per_rank = prob
    slots = ranks * per_rank
    bound = max_load_bound(load, slots, ranks)
    target = bound * (1 + slack)
    phy2log, ok = pack_to_target(load, target, ranks, per_rank)
    for layer in np.flatnonzero(ok):
        row = phy2log[layer]
        count = np.bincount(row, minlength=load.shape[1])
        assert (row >= 0).all() and count.sum() == slots  # every slot filled
        assert (count >= 1).all()  # every expert has a slot
        by_rank = row.reshape(ranks, per_rank)
        # one replica per expert per rank
        assert all(len(set(r.tolist())) == per_rank for r in by_rank)
        rank_load = (load[layer] / count)[by_rank].sum(1)
        assert rank_load.max() <= target[layer] * (1 + 1e-9) + 1e-9


@settings(max_examples=60, deadline=None)
@given(prob=problems())
def test_search_counts_only_reports_what_it_found(prob):
    load, ranks, per_rank = prob
    slots = ranks * per_rank
    bound = max_load_bound(load, slots, ranks)
    upper = bound * 1.5 + 1
    phy2log, best = search_counts(load, bound, upper, ranks, per_rank)
    for layer in range(len(load)):
        if not np.isfinite(best[layer]):
            continue
        row = phy2log[layer]
        count = np.bincount(row, minlength=load.shape[1])
        assert (count >= 1).all() and count.sum() == slots
        actual = (load[layer] / count)[row.reshape(ranks, per_rank)].sum(1).max()
        assert actual == best[layer]
        assert bound[layer] * (1 - 1e-9) <= best[layer] <= upper[layer]
