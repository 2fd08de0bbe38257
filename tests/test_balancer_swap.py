"""The vectorised swap search agrees exactly with its plain reference (eplb.balancer.reference)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer import reference, swap


@st.composite
def layouts(draw):
    layers = draw(st.integers(1, 4))
    ranks = draw(st.integers(1, 12))
    experts = draw(st.integers(1, 3 * ranks))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 2))
    slots = ranks * per_rank
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    skew = draw(st.sampled_from([0.0, 1.0, 2.0]))
    load = rng.poisson(200 / (rng.permutation(experts) + 1.0) ** skew, size=(layers, experts)).astype(float)
    # Every expert once, the rest random (second copies on a rank allowed: the search must cope).
    rows = [rng.permutation(np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]))
            for _ in range(layers)]
    return np.stack(rows), load, ranks


@settings(max_examples=80, deadline=None)
@given(case=layouts(), mode=st.sampled_from(["plain", "target", "budget", "levels"]),
       seed=st.integers(0, 1000))
def test_fast_swap_search_equals_reference(case, mode, seed):
    phy2log, load, ranks = case
    rng = np.random.default_rng(seed)
    kwargs = {}
    loads = swap.bincount2d(phy2log, load.shape[1])
    if mode == "target":
        kwargs["target"] = load.sum(1) / ranks * (1 + rng.random(len(load)) * 0.2)
    elif mode == "budget":
        kwargs["budget"] = rng.integers(0, 8, len(load))
    elif mode == "levels":
        per_rep = (load / np.maximum(loads, 1))[np.arange(len(load))[:, None], phy2log]
        prof = -np.sort(-per_rep.reshape(len(load), ranks, -1).sum(-1), axis=1)
        kwargs["levels"] = prof * (0.8 + 0.2 * rng.random((len(load), 1)))
    fast, fast_swaps = swap.swap_search(phy2log, load, ranks, **kwargs)
    ref, ref_swaps = reference.swap_search(phy2log, load, ranks, **kwargs)
    assert np.array_equal(fast, ref)
    assert np.array_equal(fast_swaps, ref_swaps)
    # A swap exchanges two slots: the multiset of experts per layer is unchanged.
    assert np.array_equal(np.sort(fast, 1), np.sort(phy2log, 1))
