"""Load estimators (eplb.balancer.estimate), the skip test (eplb.balancer.gain), their config keys."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.estimate import EwmaLoad, make_load_estimator
from eplb.balancer.gain import keep_worthwhile, predicted_gain, worth_rebalancing
from eplb.balancer.placement import Placement
from eplb.balancer.policies import get_policy
from eplb.balancer.stats import LoadWindow, balancedness
from eplb.config import EPLBConfig


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 30), half_life=st.floats(0.5, 50), seed=st.integers(0, 1000))
def test_ewma_equals_its_definition(steps, half_life, seed):
    g = torch.Generator().manual_seed(seed)
    loads = torch.randint(0, 100, (steps, 2, 5), generator=g)
    est = EwmaLoad(half_life, 2, 5)
    for x in loads:
        est.record(x)
    ages = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    want = (0.5 ** (ages / half_life))[:, None, None] * loads.double()
    torch.testing.assert_close(est.total(), want.sum(0))
    assert est.num_recorded == steps


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 30), keep=st.integers(1, 12), window=st.integers(1, 10),
       seed=st.integers(0, 1000))
def test_keep_last_forgets_older_steps(steps, keep, window, seed):
    g = torch.Generator().manual_seed(seed)
    loads = torch.randint(0, 100, (steps, 2, 3), generator=g)
    win, ew = LoadWindow(window, 2, 3), EwmaLoad(10.0, 2, 3, keep=16)
    for x in loads:
        win.record(x)
        ew.record(x)
    win.keep_last(keep)
    ew.keep_last(keep)
    assert torch.equal(win.total(), loads[-min(keep, window, steps):].sum(0))
    fresh = EwmaLoad(10.0, 2, 3)
    for x in loads[-min(keep, 16, steps):]:
        fresh.record(x)
    torch.testing.assert_close(ew.total(), fresh.total())
    win.record(loads[0])  # the ring goes on from where it was
    assert win.num_recorded == steps + 1


def test_ewma_follows_a_shift_faster_than_the_window():
    old, new = torch.tensor([[90, 10]]), torch.tensor([[10, 90]])
    win, ew = LoadWindow(100, 1, 2), EwmaLoad(5.0, 1, 2)
    for x in [old] * 100 + [new] * 10:
        win.record(x)
        ew.record(x)
    assert win.total()[0, 0] > win.total()[0, 1]  # the window still favours the old hot expert
    assert ew.total()[0, 1] > ew.total()[0, 0]


def test_make_load_estimator_from_config():
    assert isinstance(make_load_estimator(EPLBConfig(window_size=7), 2, 4), LoadWindow)
    est = make_load_estimator(EPLBConfig(load_estimator="ewma", load_half_life=3.0), 2, 4)
    assert isinstance(est, EwmaLoad) and est.half_life == 3.0
    with pytest.raises(ValueError, match="half_life"):
        EwmaLoad(0, 1, 1)


@pytest.mark.parametrize("key, value, match", [
    ("load_estimator", "median", "load_estimator must be one of window, ewma"),
    ("load_half_life", 0, "load_half_life must be a number > 0"),
    ("rebalance_trigger", "always", "rebalance_trigger must be one of interval, shift"),
    ("shift_threshold", 1.5, r"shift_threshold must be a number in \(0, 1\]"),
    ("shift_drop", 1.0, r"shift_drop must be a number in \[0, 1\)"),
    ("shift_drop", -0.01, r"shift_drop must be a number in \[0, 1\)"),
    ("shift_steps", 0, "shift_steps must be an integer >= 1"),
    ("shift_min_gap", True, "shift_min_gap must be an integer >= 1"),
    ("skip_gain_threshold", -0.1, r"skip_gain_threshold must be a number in \[0, 1\]"),
    ("replica_dispatch", "random", "replica_dispatch must be one of static, load_aware"),
])
def test_new_config_keys_are_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        EPLBConfig.from_dict({key: value})


def test_new_config_keys_keep_vllm_semantics_by_default():
    cfg = EPLBConfig()
    assert (cfg.load_estimator, cfg.rebalance_trigger, cfg.skip_gain_threshold,
            cfg.replica_dispatch) == ("window", "interval", 0.0, "static")


def _two_layers():
    load = torch.tensor([[100, 10, 10, 10], [40, 40, 10, 10]])
    old = Placement.default(2, 4, 2, 0)
    new = get_policy("refined")(load, 2, 0)
    return load, old, new


def test_keep_worthwhile_keeps_old_layers_below_the_gain():
    load, old, new = _two_layers()
    gain = predicted_gain(load, old, new)
    assert torch.allclose(gain, balancedness(load, new) - balancedness(load, old))
    assert gain[1] > gain[0] >= 0
    mid = float(gain[0] + gain[1]) / 2
    kept = keep_worthwhile(load, old, new, mid)
    assert torch.equal(kept.phy2log[0], old.phy2log[0]) and torch.equal(kept.phy2log[1], new.phy2log[1])
    assert keep_worthwhile(load, old, new, 0.0) is new
    assert worth_rebalancing(load, old, new, mid)
    assert not worth_rebalancing(load, old, new, float(gain.max()) + 1e-6)
    assert worth_rebalancing(load, old, old, 0.0)


@settings(max_examples=30, deadline=None)
@given(before=st.integers(0, 20), keep=st.integers(1, 8), after=st.integers(0, 12))
def test_steps_are_the_counted_steps_oldest_first(before, keep, after):
    loads = torch.arange(before + after).view(-1, 1, 1).expand(-1, 1, 2).clone()
    for est, cap in ((LoadWindow(10, 1, 2), 10), (EwmaLoad(4.0, 1, 2, keep=10), 10)):
        for x in loads[:before]:
            est.record(x)
        est.keep_last(keep)
        for x in loads[before:]:
            est.record(x)
        held = min(min(keep, before, cap) + after, cap)
        want = loads[before + after - held: before + after].double()
        assert torch.equal(est.steps().double(), want)
        # the total is the (weighted) sum of exactly these steps
        if isinstance(est, LoadWindow):
            assert torch.equal(est.total(), want.sum(0).long())
