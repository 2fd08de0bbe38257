"""Placement views, validation, persistence; LoadWindow; balancedness and its bound."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.placement import Placement
from eplb.balancer.stats import LoadWindow, balancedness, balancedness_upper_bound, rank_loads


def test_default_placement_round_robin():
    p = Placement.default(2, 4, 3, 2)  # 6 slots, 2 per rank
    assert p.phy2log.tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert p.replica_count.tolist() == [[2, 2, 1, 1]] * 2
    assert p.log2phy[0].tolist() == [[0, 4], [1, 5], [2, -1], [3, -1]]
    assert (p.slots_per_rank, p.num_physical, p.num_experts, p.num_layers) == (2, 6, 4, 2)
    assert [p.rank_of_slot(s) for s in range(6)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    "phy2log, experts, ranks, match",
    [
        ([[0, 0, 1, 1]], 3, 2, "expert 2 of layer 0 has no slot"),
        ([[0, 1, 2]], 3, 2, "must divide"),
        ([[0, 1, 5, 2]], 3, 2, r"expert ids in \[0, 3\)"),
        ([0, 1, 2], 3, 1, "2-D"),
    ],
)
def test_validation_names_the_problem(phy2log, experts, ranks, match):
    with pytest.raises(ValueError, match=match):
        Placement.from_phy2log(torch.tensor(phy2log), experts, ranks)


def test_validate_catches_inconsistent_views():
    p = Placement.default(1, 4, 2, 0)
    bad = Placement(p.phy2log, p.log2phy, torch.tensor([[2, 1, 1, 0]]), 2)
    with pytest.raises(ValueError, match="replica_count"):
        bad.validate()
    bad = Placement(p.phy2log, p.log2phy.flip(1), p.replica_count, 2)
    with pytest.raises(ValueError, match="log2phy"):
        bad.validate()


def test_default_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_ranks"):
        Placement.default(1, 10, 4, 1)
    with pytest.raises(ValueError, match="num_redundant"):
        Placement.default(1, 10, 2, -2)


@st.composite
def placements(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 12))
    ranks = draw(st.integers(1, 6))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    slots = ranks * per_rank
    rows = []
    for _ in range(layers):
        extra = draw(st.lists(st.integers(0, experts - 1), min_size=slots - experts, max_size=slots - experts))
        perm = draw(st.permutations(list(range(experts)) + extra))
        rows.append(perm)
    return Placement.from_phy2log(torch.tensor(rows), experts, ranks)


@settings(max_examples=60, deadline=None)
@given(p=placements())
def test_views_consistent_and_json_roundtrip(p, tmp_path_factory):
    for layer in range(p.num_layers):
        for e in range(p.num_experts):
            slots = [s for s in p.log2phy[layer, e].tolist() if s >= 0]
            assert slots == sorted(slots)
            assert len(slots) == p.replica_count[layer, e] >= 1
            assert all(p.phy2log[layer, s] == e for s in slots)
    path = tmp_path_factory.mktemp("p") / "p.json"
    p.save(path)
    q = Placement.load(path)
    assert q == p and torch.equal(q.log2phy, p.log2phy)


def test_from_json_errors():
    with pytest.raises(ValueError, match="phy2log"):
        Placement.from_json({"num_ranks": 1, "num_experts": 2})


def test_load_window_ring_buffer():
    w = LoadWindow(3, 1, 2)
    for t in range(5):
        w.record(torch.tensor([[t, 1]]))
    assert w.num_recorded == 5
    assert w.total().tolist() == [[2 + 3 + 4, 3]]
    with pytest.raises(ValueError, match="shape"):
        w.record(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="window_size"):
        LoadWindow(0, 1, 1)


def test_balancedness_by_hand():
    # Experts 0,1 on rank 0; experts 2 and a replica of 0 on rank 1.
    p = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0]]), 3, 2)
    load = torch.tensor([[10, 4, 2]])
    # Expert 0 splits 5/5: rank loads 9 and 7 -> mean 8, max 9.
    assert rank_loads(load, p).tolist() == [[9.0, 7.0]]
    assert balancedness(load, p).item() == pytest.approx(8 / 9)
    assert balancedness(torch.zeros(1, 3), p).item() == 1.0
    # Bound: mean 8; best replication of 4 slots over loads (10, 4, 2): max replica 5 -> 8/8.
    assert balancedness_upper_bound(load, 2, 1).item() == pytest.approx(1.0)
    assert balancedness_upper_bound(torch.tensor([[100, 1, 1, 1]]), 4, 0).item() == pytest.approx(25.75 / 100)


@settings(max_examples=60, deadline=None)
@given(p=placements(), seed=st.integers(0, 2**31 - 1))
def test_balancedness_at_most_bound(p, seed):
    g = torch.Generator().manual_seed(seed)
    load = torch.randint(0, 50, (p.num_layers, p.num_experts), generator=g)
    b = balancedness(load, p)
    bound = balancedness_upper_bound(load, p.num_ranks, p.num_redundant)
    assert ((b > 0) & (b <= 1 + 1e-12)).all()
    assert (b <= bound + 1e-9).all()
    assert (bound <= 1 + 1e-12).all()
