"""Synthetic traces and the .npz format."""

import numpy as np
import pytest

from eplb.sim.traces import SyntheticSpec, load_trace, parse_spec, save_trace, synthetic_trace


def test_synthetic_trace_shape_skew_and_shift():
    spec = SyntheticSpec(steps=40, layers=2, experts=16, tokens=4000, skew=1.5, drift=0.0,
                         shift_at=20, seed=3)
    load = synthetic_trace(spec)
    assert load.shape == (40, 2, 16) and load.dtype == np.int64
    assert (load.sum(-1) == 4000).all()
    before, after = load[:20].sum(0), load[20:].sum(0)
    # Zipf(1.5): the hottest expert takes far more than the mean share.
    assert before.max(-1).min() > 4 * before.mean(-1).max()
    # The sudden change draws a new ranking of experts.
    assert (before.argmax(-1) != after.argmax(-1)).any()
    assert np.array_equal(load, synthetic_trace(spec))  # deterministic per seed


def test_drift_changes_popularity_over_time():
    spec = SyntheticSpec(steps=400, layers=1, experts=32, tokens=20000, skew=0.5, drift=0.2,
                         shift_at=-1)
    load = synthetic_trace(spec)
    first, last = load[:50].sum(0)[0], load[-50:].sum(0)[0]
    assert np.corrcoef(first, last)[0, 1] < 0.9
    flat = synthetic_trace(SyntheticSpec(steps=400, layers=1, experts=32, tokens=20000, skew=0.5,
                                         drift=0.0, shift_at=-1))
    assert np.corrcoef(flat[:50].sum(0)[0], flat[-50:].sum(0)[0])[0, 1] > 0.95


def test_parse_spec():
    assert parse_spec("default") == SyntheticSpec()
    spec = parse_spec("steps=100,skew=1.5,experts=8")
    assert (spec.steps, spec.skew, spec.experts, spec.shift_at) == (100, 1.5, 8, 50)
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("stpes=3")
    with pytest.raises(ValueError, match="steps must be"):
        parse_spec("steps=0")
    with pytest.raises(ValueError, match="must be a number"):
        parse_spec("skew=high")


def test_npz_roundtrip_and_errors(tmp_path):
    load = synthetic_trace(SyntheticSpec(steps=5, layers=2, experts=4))
    save_trace(tmp_path / "t.npz", load)
    assert np.array_equal(load_trace(tmp_path / "t.npz"), load)
    np.savez(tmp_path / "flat.npz", load=np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="3-D"):
        load_trace(tmp_path / "flat.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros((3, 4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="no 'load'"):
        load_trace(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "missing.npz")


def test_bursts_route_by_another_ranking():
    kw = dict(steps=60, layers=1, experts=16, tokens=8000, skew=1.5, drift=0.0, shift_at=-1, seed=5)
    load = synthetic_trace(SyntheticSpec(**kw, burst_every=20, burst_len=5))[:, 0]
    plain = synthetic_trace(SyntheticSpec(**kw))[:, 0]
    assert np.array_equal(load[:15], plain[:15])  # the same draws up to the first burst
    # burst steps agree with each other, not with the calm ranking
    def rank_corr(a, b):
        return np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1]

    assert rank_corr(load[15], load[35]) > 0.9
    assert rank_corr(load[15], plain[15]) < 0.5
    with pytest.raises(ValueError, match="burst_len"):
        parse_spec("burst_every=5,burst_len=9")
