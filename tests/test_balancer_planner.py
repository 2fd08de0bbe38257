"""Planner: transfers applied to the old placement give the new one, from valid sources."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.placement import Placement
from eplb.balancer.planner import Transfer, apply_plan, num_moves, plan
from eplb.balancer.policies import get_policy


@st.composite
def placement_pairs(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 10))
    ranks = draw(st.integers(1, 5))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 2))
    slots = ranks * per_rank

    def one():
        rows = []
        for _ in range(layers):
            extra = draw(st.lists(st.integers(0, experts - 1), min_size=slots - experts,
                                  max_size=slots - experts))
            rows.append(draw(st.permutations(list(range(experts)) + extra)))
        return Placement.from_phy2log(torch.tensor(rows), experts, ranks)

    old = one()
    if draw(st.booleans()):
        return old, one()
    # A small edit of old: the common case of a migration-aware rebalance.
    new = old.phy2log.clone()
    for _ in range(draw(st.integers(0, 3))):
        a, b = draw(st.integers(0, slots - 1)), draw(st.integers(0, slots - 1))
        layer = draw(st.integers(0, layers - 1))
        new[layer, a], new[layer, b] = new[layer, b].clone(), new[layer, a].clone()
    return old, Placement.from_phy2log(new, experts, ranks)


@settings(max_examples=80, deadline=None)
@given(pair=placement_pairs())
def test_plan_transforms_old_into_new(pair):
    old, new = pair
    transfers = plan(old, new)
    assert len(transfers) == old.num_layers
    assert apply_plan(old, transfers) == new
    per_rank = old.slots_per_rank
    for layer, layer_transfers in enumerate(transfers):
        dsts = [t.dst_slot for t in layer_transfers]
        assert len(dsts) == len(set(dsts))
        # Exactly the slots that change get a transfer.
        assert sorted(dsts) == (old.phy2log[layer] != new.phy2log[layer]).nonzero().flatten().tolist()
        for t in layer_transfers:
            assert isinstance(t, Transfer)
            assert old.phy2log[layer, t.src_slot] == t.expert == new.phy2log[layer, t.dst_slot]
            assert t.src_rank == t.src_slot // per_rank and t.dst_rank == t.dst_slot // per_rank
            dst_had = t.expert in old.phy2log[layer, t.dst_rank * per_rank:(t.dst_rank + 1) * per_rank]
            assert (t.src_rank == t.dst_rank) == bool(dst_had)
    assert num_moves(transfers) == int(new.moved_slots(old).sum())


def test_plan_identity_is_empty_and_shape_mismatch_errors():
    p = Placement.default(2, 6, 2, 2)
    assert plan(p, p) == [[], []]
    with pytest.raises(ValueError, match="shape"):
        plan(p, Placement.default(2, 6, 2, 0))


def test_plan_spreads_sources_over_holders():
    # Expert 0 is on ranks 0 and 1; ranks 2 and 3 each need a copy.
    old = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2, 3, 3, 4, 4]]), 5, 4)
    new = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2, 0, 3, 0, 4]]), 5, 4)
    [transfers] = plan(old, new)
    srcs = sorted(t.src_rank for t in transfers if t.expert == 0)
    assert srcs == [0, 1]


def test_plan_for_policy_output():
    g = torch.Generator().manual_seed(1)
    load = torch.randint(0, 100, (3, 16), generator=g)
    old = get_policy("deepseek")(load, 4, 4)
    new = get_policy("refined")(load.flip(1), 4, 4, previous=old)
    assert apply_plan(old, plan(old, new)) == new
