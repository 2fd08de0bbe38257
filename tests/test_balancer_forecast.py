"""Forecasting the next interval's load (eplb.balancer.forecast) and its use by `refined`."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer import forecast
from eplb.balancer.placement import Placement
from eplb.balancer.policies import get_policy
from eplb.balancer.refined import quick_placement
from eplb.balancer.select import best_per_layer
from eplb.balancer.stats import balancedness
from eplb.sim.traces import SyntheticSpec, synthetic_trace


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), half_life=st.floats(0.5, 500.0))
def test_recency_weights_halve_every_half_life(n, half_life):
    w = forecast.recency_weights(n, half_life)
    assert w.shape == (n,) and w[-1] == 1.0  # newest last, weight 1
    assert (w[1:] > w[:-1]).all()  # strictly more weight the more recent
    age = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    assert torch.allclose(w, 0.5 ** (age / half_life))
    assert torch.equal(forecast.recency_weights(n, float("inf")), torch.ones(n, dtype=torch.float64))


@st.composite
def shapes(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 16))
    ranks = draw(st.integers(1, 4))
    per_rank = draw(st.integers(max(1, -(-experts // ranks)), -(-experts // ranks) + 2))
    return layers, experts, ranks, ranks * per_rank - experts


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), steps=st.integers(1, 80), seed=st.integers(0, 2**31 - 1))
def test_constant_traffic_keeps_the_flat_sum(shape, steps, seed):
    """Every candidate is the same load up to a factor, so with a fit that sees only the load's
    shape every candidate places the same way and scores the same on the held-out steps: the
    choice must stay with the flat sum (a tie never switches). (quick_placement itself is not
    scale-invariant: float sums can break its ties differently, and a candidate whose placement
    is then strictly better on constant traffic rightly wins, so the fit normalises first.)"""
    layers, experts, ranks, redundant = shape
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(0, 50, (layers, experts), generator=g)
    history = step.expand(steps, -1, -1).clone()

    def fit(x):
        share = x / x.sum(-1, keepdim=True).clamp_min(1e-300)
        return quick_placement(torch.round(share * 1e6), ranks, redundant)

    choice, weights = forecast.choose_fit(history, fit, ranks)
    assert choice.tolist() == [0] * layers
    assert weights.shape == (1 + len(forecast.HALF_LIVES), steps)
    estimate, step_w = forecast.forecast_load(step * steps, history, choice, weights)
    assert torch.equal(estimate, (step * steps).double())
    assert torch.equal(step_w, torch.ones(steps, layers, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), steps=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_forecast_load_takes_each_layers_chosen_weighting(shape, steps, seed):
    layers, experts, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 30, (steps, layers, experts), generator=g)
    weights = forecast.candidate_weights(steps, tuple(f * steps for f in forecast.HALF_LIVES))
    choice = torch.randint(0, weights.shape[0], (layers,), generator=g)
    load = torch.randint(0, 1000, (layers, experts), generator=g)
    estimate, step_w = forecast.forecast_load(load, history, choice, weights)
    for layer, c in enumerate(choice.tolist()):
        want = load[layer].double() if c == 0 else weights[c] @ history[:, layer].double()
        assert torch.allclose(estimate[layer], want)
        assert torch.equal(step_w[:, layer], weights[c])


@settings(max_examples=40, deadline=None)
@given(shape=shapes(), steps=st.integers(1, 6), cands=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_step_balancedness_matches_stats(shape, steps, cands, seed):
    layers, experts, ranks, redundant = shape
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 20, (steps, layers, experts), generator=g)
    load[0, 0] = 0  # an idle layer counts as 1
    placements = [quick_placement(torch.rand(layers, experts, generator=g), ranks, redundant)
                  for _ in range(cands)]
    got = forecast.step_balancedness(load, torch.stack(placements), ranks)
    for c, p in enumerate(placements):
        want = balancedness(load, Placement.from_phy2log(p, experts, ranks))
        assert torch.allclose(got[:, c], want)


def _trace(**kw):
    spec = SyntheticSpec(layers=2, experts=64, tokens=64 * 128, skew=1.0, seed=3,
                         **{"steps": 100, "drift": 0.0, "shift_at": -1, **kw})
    return torch.from_numpy(synthetic_trace(spec))


def _choice(history, ranks=8, redundant=8):
    return forecast.choose_fit(history, lambda x: quick_placement(x, ranks, redundant), ranks)[0]


def test_after_a_shift_the_recent_steps_win_and_forecast_better():
    both = _trace(shift_at=50, steps=200)  # a new ranking at step 50; 50-199 is what follows
    history, future = both[:100], both[100:]
    assert (_choice(history) > 0).all()  # a recency weighting, on every layer
    fit_flat = get_policy("refined")(history.sum(0), 8, 8)
    fit_fc = get_policy("refined")(history.sum(0), 8, 8, history=history)
    gain = balancedness(future, fit_fc).mean(0) - balancedness(future, fit_flat).mean(0)
    assert (gain > 0.02).all()  # more than 2 points on the traffic after the window


def test_stationary_and_bursty_traffic_keep_the_flat_sum():
    assert _choice(_trace()).tolist() == [0, 0]
    # A burst of another workload in the last 10 of every 50 steps: the window ends in one, and
    # a recency weighting fit there would balance the burst, not the 80% of steps after it.
    assert _choice(_trace(burst_every=50, burst_len=10)).tolist() == [0, 0]


def test_best_per_layer_judges_on_the_weighted_steps():
    g = torch.Generator().manual_seed(2)
    calm = torch.tensor([40, 30, 20, 10, 1, 1, 1, 1])
    burst = torch.tensor([1, 1, 1, 1, 40, 30, 20, 10])
    history = torch.stack([calm if t < 10 else burst for t in range(20)])[:, None].double() * 10
    history = torch.poisson(history, generator=g).long()
    a = get_policy("refined")(history[:10].sum(0), 4, 4)  # fits the calm steps
    b = get_policy("refined")(history[10:].sum(0), 4, 4)  # fits the bursts
    late = torch.cat([torch.zeros(10), torch.ones(10)]).double()[:, None]
    early = 1 - late
    assert best_per_layer(history, [a, b], 0.0, weights=late) is not a
    assert torch.equal(best_per_layer(history, [a, b], 0.0, weights=late).phy2log, b.phy2log)
    assert best_per_layer(history, [a, b], 0.0, weights=early) is a
    # uniform weights are the plain mean: the same choice as without weights
    flat = best_per_layer(history, [b, a], 0.0, weights=torch.ones(20, 1))
    assert torch.equal(flat.phy2log, best_per_layer(history, [b, a], 0.0).phy2log)


def test_short_history_keeps_the_flat_sum_and_the_old_behaviour():
    history = _trace(shift_at=10)[:20]  # 5 held-out steps: too few to judge
    assert _choice(history).tolist() == [0, 0]
    choice, weights = forecast.choose_fit(history, lambda x: quick_placement(x, 8, 8), 8,
                                          half_life_fractions=())
    assert choice.tolist() == [0, 0] and weights.shape == (1, 20)


def test_the_forecast_applies_only_to_the_window_sum_of_the_history():
    """An estimate that is not the flat sum of the history (the EWMA estimator's) is already a
    weighting chosen by the operator: refined fits it as it is."""
    from unittest import mock

    history = _trace(shift_at=50)
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return forecast.choose_fit(*args, **kw)

    with mock.patch("eplb.balancer.policies.choose_fit", side_effect=spy):
        get_policy("refined")(history.sum(0) * 2, 8, 8, history=history)
        assert not calls
        get_policy("refined")(history.sum(0), 8, 8, history=history)
        assert len(calls) == 1
