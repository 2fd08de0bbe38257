"""The rebalance trigger (eplb.balancer.trigger)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.trigger import RebalanceTrigger, make_trigger
from eplb.config import EPLBConfig


def _run(trigger, values):
    """Feed values; start every rebalance it asks for; return [(step, decision)]."""
    fired = []
    for b in values:
        trigger.observe(b)
        d = trigger.decide()
        if d.rebalance:
            fired.append((trigger.steps, d))
            trigger.started(d)
    return fired


@pytest.mark.parametrize("mode", ["interval", "shift"])
def test_interval_fires_every_step_interval(mode):
    fired = _run(RebalanceTrigger(mode, 7), [0.9] * 30)
    assert [(s, d.reason, d.fit_steps) for s, d in fired] == [(7, "interval", None), (14, "interval", None),
                                                              (21, "interval", None), (28, "interval", None)]


def test_shift_fires_soon_after_a_drop_then_refits_once():
    t = RebalanceTrigger("shift", 1000, shift_threshold=0.9, shift_steps=4, min_gap=16)
    fired = _run(t, [0.95] * 50 + [0.5] * 60)
    steps = [(s, d.reason, d.fit_steps) for s, d in fired]
    # the drop starts at step 51; 4 steps of it are below 0.9 * 0.95 at step 54
    assert steps[0] == (54, "shift", 4)
    assert steps[1] == (70, "shift-followup", 20)  # min_gap later, fit on every step since the shift
    assert len(steps) == 2  # the new level is the new normal: no more early rebalances


def test_interval_mode_ignores_drops():
    assert _run(RebalanceTrigger("interval", 1000), [0.95] * 50 + [0.3] * 50) == []


@settings(max_examples=50, deadline=None)
@given(level=st.floats(0.05, 1.0), noise=st.lists(st.floats(-0.04, 0.04), min_size=10, max_size=200))
def test_no_shift_rebalance_while_balancedness_holds(level, noise):
    # Variation within +-4% of the level never falls below 0.9 of the reference.
    values = [level * (1 + n) for n in noise]
    t = RebalanceTrigger("shift", 10_000, shift_threshold=0.9, shift_steps=3, min_gap=5, shift_drop=0.0)
    assert _run(t, values) == []


def test_absolute_drop_fires_where_the_relative_one_does_not():
    # Mixtral-8x7B EP 4 R 0's shift in bench/balancer.py: 0.605 -> 0.563 is 7% relative.
    values = [0.605] * 50 + [0.563] * 60
    fired = _run(RebalanceTrigger("shift", 1000, shift_threshold=0.9, shift_steps=12, min_gap=16,
                                  shift_drop=0.02), values)
    assert [(s, d.reason) for s, d in fired] == [(62, "shift"), (78, "shift-followup")]
    assert _run(RebalanceTrigger("shift", 1000, shift_threshold=0.9, shift_steps=12, min_gap=16,
                                 shift_drop=0.0), values) == []


@settings(max_examples=100, deadline=None)
@given(level=st.floats(0.2, 0.99), steps=st.integers(1, 8),
       parts=st.lists(st.tuples(st.lists(st.floats(-0.009, 0.009), min_size=1, max_size=30),
                                st.integers(0, 7), st.floats(0.0, 1.0)), min_size=1, max_size=10))
def test_bursts_shorter_than_shift_steps_never_fire(level, steps, parts):
    # Normal steps within 0.009 of the level, separated by bursts (any depth) of fewer than
    # shift_steps steps: every window holds a normal step at most 0.018 below the reference.
    values = []
    for noise, burst_len, depth in parts:
        values += [level + n for n in noise] + [level * depth] * min(burst_len, steps - 1)
    t = RebalanceTrigger("shift", 10_000, shift_threshold=0.9, shift_steps=steps, min_gap=1,
                         shift_drop=0.02)
    assert _run(t, values) == []


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=120), gap=st.integers(1, 20))
def test_shift_rebalances_keep_the_minimum_gap(values, gap):
    t = RebalanceTrigger("shift", 10_000, shift_threshold=0.95, shift_steps=2, min_gap=gap)
    fired = [s for s, d in _run(t, values)]
    assert all(b - a >= gap for a, b in zip(fired, fired[1:]))


def test_make_trigger_from_config():
    t = make_trigger(EPLBConfig(step_interval=5, rebalance_trigger="shift", shift_threshold=0.8,
                                shift_steps=2, shift_min_gap=3))
    assert (t.mode, t.step_interval, t.shift_threshold, t.shift_steps, t.min_gap) == ("shift", 5, 0.8, 2, 3)
    assert t.shift_drop == EPLBConfig().shift_drop == 0.02
    assert make_trigger(EPLBConfig(rebalance_trigger="shift", shift_drop=0.0)).shift_drop == 0.0
    with pytest.raises(ValueError, match="rebalance_trigger"):
        RebalanceTrigger("never", 5)
