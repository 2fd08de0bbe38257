"""Policies: DeepSeek's README example, validity properties, migration awareness, errors."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb.balancer.refined as refined_mod
from eplb.balancer.placement import Placement
from eplb.balancer.policies import POLICIES, get_policy
from eplb.balancer.stats import balancedness, balancedness_upper_bound, rank_loads

README_LOAD = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_deepseek_reproduces_readme_example():
    p = get_policy("deepseek")(README_LOAD, 8, 4, num_nodes=2, num_groups=4)
    assert p.phy2log.tolist() == README_PHY2LOG
    assert p.replica_count.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                        [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_deepseek_hierarchical_keeps_groups_on_nodes():
    p = get_policy("deepseek")(README_LOAD, 8, 4, num_nodes=2, num_groups=4)
    for layer in range(2):
        for node in range(2):
            groups = {e // 3 for e in p.phy2log[layer, node * 8:(node + 1) * 8].tolist()}
            assert len(groups) == 2  # two whole groups of 3 experts per node


def test_refined_beats_deepseek_on_readme_example():
    ds = get_policy("deepseek")(README_LOAD, 8, 4, num_nodes=2, num_groups=4)
    ours = get_policy("refined")(README_LOAD, 8, 4, num_nodes=2, num_groups=4)
    assert (balancedness(README_LOAD, ours) >= balancedness(README_LOAD, ds)).all()


@st.composite
def problems(draw):
    layers = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 24))
    ranks = draw(st.integers(1, 8))
    per_rank = draw(st.integers(max(1, -(-experts // ranks)), -(-experts // ranks) + 3))
    redundant = ranks * per_rank - experts
    seed = draw(st.integers(0, 2**31 - 1))
    skew = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    g = torch.Generator().manual_seed(seed)
    pop = 1.0 / (torch.randperm(experts, generator=g) + 1.0) ** skew
    load = torch.poisson(pop.repeat(layers, 1) * 200, generator=g).long()
    if draw(st.booleans()):
        load[0] = 0  # an idle layer
    return load, ranks, redundant


@settings(max_examples=60, deadline=None)
@given(prob=problems(), name=st.sampled_from(sorted(POLICIES)))
def test_every_policy_gives_valid_placement(prob, name):
    load, ranks, redundant = prob
    p = get_policy(name)(load, ranks, redundant)
    p.validate()
    num_layers, num_experts = load.shape
    assert p.phy2log.shape == (num_layers, num_experts + redundant)
    assert p.num_ranks == ranks and p.slots_per_rank * ranks == num_experts + redundant
    assert (p.replica_count >= 1).all()
    assert (p.replica_count.sum(1) == num_experts + redundant).all()
    b = balancedness(load, p)
    assert ((b > 0) & (b <= 1 + 1e-12)).all()
    assert (b <= balancedness_upper_bound(load, ranks, redundant) + 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(prob=problems())
def test_refined_avoids_second_copy_on_a_rank_unless_strictly_better(prob):
    load, ranks, redundant = prob
    with mock.patch.object(refined_mod, "SECOND_TRY", float("inf")):  # distinct packing only
        distinct = get_policy("refined")(load, ranks, redundant)
    if distinct.num_experts >= distinct.slots_per_rank:
        # Enough distinct experts to fill every rank: no rank needs a second copy.
        assert (distinct.replica_count <= ranks).all()
        assert (distinct.num_colocated() == 0).all(), distinct.phy2log
    p = get_policy("refined")(load, ranks, redundant)
    peak = rank_loads(load, p).amax(-1)
    peak_distinct = rank_loads(load, distinct).amax(-1)
    assert (peak <= peak_distinct + 1e-9).all()
    # Every layer either keeps the distinct packing or takes another one (a second copy on a
    # rank, or counts searched with the packing) that strictly lowers its max load.
    same = (p.phy2log == distinct.phy2log).all(1)
    assert (same | (peak < peak_distinct)).all()


@settings(max_examples=30, deadline=None)
@given(prob=problems(), seed=st.integers(0, 1000), cap=st.one_of(st.none(), st.integers(0, 6)))
def test_refined_with_previous(prob, seed, cap):
    load, ranks, redundant = prob
    refined = get_policy("refined")
    start = refined(load, ranks, redundant)
    # Same load again: nothing to gain, nothing moves.
    again = refined(load, ranks, redundant, previous=start, max_moves=cap)
    assert again == start
    g = torch.Generator().manual_seed(seed)
    drifted = (load.double() * (0.5 + torch.rand(load.shape, generator=g, dtype=torch.float64))).round()
    moved = refined(drifted, ranks, redundant, previous=start, max_moves=cap)
    moved.validate()
    if cap is not None:
        assert (moved.moved_slots(start) <= cap).all()
    else:
        # Never worse than a fresh placement by more than the warm-start tolerance.
        fresh = refined(drifted, ranks, redundant)
        from eplb.balancer.refined import TOLERANCE
        assert (balancedness(drifted, moved) * (1 + TOLERANCE) >= balancedness(drifted, fresh) - 1e-9).all()


def test_migration_aware_moves_fewer_than_deepseek():
    g = torch.Generator().manual_seed(0)
    pop = 1.0 / (torch.arange(64) + 1.0)
    load = torch.stack([pop[torch.randperm(64, generator=g)] for _ in range(6)]) * 1e4
    drifted = load * (1 + 0.05 * torch.rand(load.shape, generator=g))
    ds, ours = get_policy("deepseek"), get_policy("refined")
    ds_moves = ds(drifted, 8, 8, previous=ds(load, 8, 8)).moved_slots(ds(load, 8, 8)).sum()
    start = ours(load, 8, 8)
    after = ours(drifted, 8, 8, previous=start)
    assert after.moved_slots(start).sum() * 2 <= ds_moves
    # On the window itself the warm start may trail by the tolerance it trades for fewer moves.
    from eplb.balancer.refined import TOLERANCE
    ds_bal = balancedness(drifted, ds(drifted, 8, 8)).mean()
    assert balancedness(drifted, after).mean() * (1 + TOLERANCE) >= ds_bal


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_ranks=5, num_redundant=0), "must divide"),
        (dict(num_ranks=4, num_redundant=-1), "num_redundant"),
        (dict(num_ranks=4, num_redundant=0, num_nodes=3, num_groups=3), "num_nodes"),
        (dict(num_ranks=4, num_redundant=0, max_moves=-1), "max_moves"),
        (dict(num_ranks=4, num_redundant=4, previous=Placement.default(2, 12, 4, 0)), "previous"),
    ],
)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_argument_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_policy(name)(README_LOAD, **kwargs)


def test_bad_load_and_unknown_policy():
    with pytest.raises(ValueError, match="2-D"):
        get_policy("refined")(torch.ones(12), 4, 0)
    with pytest.raises(ValueError, match=">= 0"):
        get_policy("refined")(-README_LOAD, 4, 0)
    with pytest.raises(ValueError, match="deepseek, refined"):
        get_policy("nope")


@settings(max_examples=200, deadline=None)
@given(prob=problems())
def test_refined_never_less_balanced_than_greedy_on_the_fitted_load(prob):
    load, ranks, redundant = prob
    ours = get_policy("refined")(load, ranks, redundant)
    greedy = get_policy("deepseek")(load, ranks, redundant)
    # every layer not at the bound also tries greedy's own packing (before: within 1% of the
    # bound a lucky greedy packing could be a hair better, e.g. 149.67 against 149.5 on 2 ranks)
    ours_max, greedy_max = rank_loads(load, ours).amax(-1), rank_loads(load, greedy).amax(-1)
    assert (ours_max <= greedy_max * (1 + 1e-9) + 1e-9).all()


def test_history_picks_greedy_per_layer_only_when_it_is_better_step_by_step():
    from eplb.balancer.select import best_per_layer

    g = torch.Generator().manual_seed(1)
    # Two regimes: calm steps favour experts 0-3, bursts favour 4-7 (one layer each way).
    calm = torch.tensor([40, 30, 20, 10, 1, 1, 1, 1]).repeat(2, 1)
    burst = torch.tensor([1, 1, 1, 1, 40, 30, 20, 10]).repeat(2, 1)
    history = torch.stack([calm if t % 5 else burst for t in range(20)])
    history = torch.poisson(history.double() * 10, generator=g).long()
    a = get_policy("refined")(history.sum(0), 4, 4)
    b = get_policy("deepseek")(history.sum(0), 4, 4)
    per_a = balancedness(history, a).mean(0)
    per_b = balancedness(history, b).mean(0)
    assert (per_b > per_a).all()  # the regimes make the tight fit worse step by step
    chosen = best_per_layer(history, [a, b], 0.0)
    want = torch.where((per_b > per_a)[:, None], b.phy2log, a.phy2log)
    assert torch.equal(chosen.phy2log, want)
    assert (balancedness(history, chosen).mean(0) >= torch.maximum(per_a, per_b) - 1e-12).all()
    # a margin above every difference keeps the first candidate
    assert best_per_layer(history, [a, b], 1.0) is a
    p = get_policy("refined")(history.sum(0), 4, 4, history=history)
    assert (balancedness(history, p).mean(0) >= per_a - 1e-12).all()
    with pytest.raises(ValueError, match="history must be"):
        get_policy("refined")(history.sum(0), 4, 4, history=history[:, :1])


def test_window_steps_oldest_first():
    from eplb.balancer.stats import LoadWindow

    w = LoadWindow(3, 1, 2)
    for t in range(5):
        w.record(torch.tensor([[t, 0]]))
    assert w.steps()[:, 0, 0].tolist() == [2, 3, 4]
