"""The server replay (eplb.sim.simulate.replay): estimator, trigger and skip as the config says."""

import numpy as np

from eplb.config import EPLBConfig
from eplb.sim.simulate import hindsight, replay, simulate
from eplb.sim.traces import SyntheticSpec, synthetic_trace

TRACE = synthetic_trace(SyntheticSpec(steps=240, layers=2, experts=16, tokens=4000, skew=1.2,
                                      drift=0.0, shift_at=130, seed=4))


def _cfg(**kw):
    return EPLBConfig(window_size=60, step_interval=60, num_redundant_experts=4, **kw)


def test_default_config_replays_like_simulate():
    a = replay(TRACE, _cfg(), 4)
    b = simulate(TRACE, "refined", 4, 4, window_size=60, step_interval=60)
    assert np.array_equal(a.balancedness, b.balancedness) and a.copies_moved == b.copies_moved
    assert [s for s, _ in a.events] == [60, 120, 180]


def test_shift_trigger_recovers_within_steps_of_the_shift():
    interval = replay(TRACE, _cfg(), 4)
    shift = replay(TRACE, _cfg(rebalance_trigger="shift", shift_steps=3, shift_min_gap=8), 4)
    reasons = dict(shift.events)
    early = [s for s, r in shift.events if r == "shift"]
    assert early and 130 < early[0] <= 134  # fires within a few steps of the shift
    assert "shift-followup" in reasons.values()
    after = slice(134, 180)  # before the next interval rebalance
    assert shift.balancedness[after].mean() > interval.balancedness[after].mean() + 0.05
    best = hindsight(TRACE, "refined", 4, 4, step_interval=60)
    assert shift.balancedness[150:180].mean() > best[150:180].mean() - 0.02


def test_skip_gain_threshold_moves_fewer_copies():
    base = replay(TRACE, _cfg(), 4)
    gain = base.balancedness[60:120].mean() - base.balancedness[:60].mean()  # first rebalance
    assert gain > 0.1 and base.copies_moved > 0
    # a threshold above every layer's gain keeps the default placement: nothing moves
    skip = replay(TRACE, _cfg(skip_gain_threshold=1.0), 4)
    assert skip.copies_moved == 0 and skip.rebalances == base.rebalances
    # one below the first rebalance's gain lets that one through
    some = replay(TRACE, _cfg(skip_gain_threshold=0.05), 4)
    assert some.copies_moved > 0 and some.balancedness[60:120].mean() > base.balancedness[:60].mean() + 0.1


def test_ewma_estimate_replays():
    r = replay(TRACE, _cfg(load_estimator="ewma", load_half_life=10.0), 4)
    assert r.rebalances == 3 and r.balancedness.shape == (240, 2)
    assert (r.balancedness > 0).all() and (r.balancedness <= 1 + 1e-12).all()
