"""Load-aware replica dispatch (eplb.balancer.dispatch): exact, balanced, graph-safe shapes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.balancer.dispatch import static_slots, water_fill_slots
from eplb.balancer.placement import Placement


@st.composite
def steps(draw):
    ranks = draw(st.integers(1, 8))
    experts = draw(st.integers(1, 16))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    slots = ranks * per_rank
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    phy2log = torch.cat([torch.arange(experts), torch.randint(0, experts, (slots - experts,), generator=g)])
    phy2log = phy2log[torch.randperm(slots, generator=g)]
    skew = draw(st.sampled_from([0.0, 1.0, 2.0]))
    pop = 1.0 / (torch.randperm(experts, generator=g) + 1.0) ** skew
    pairs = draw(st.integers(0, 300))
    ids = torch.multinomial(pop, pairs, replacement=True, generator=g) if pairs else torch.zeros(0, dtype=torch.long)
    extra = draw(st.one_of(st.none(), st.just("random")))
    rank_load = None if extra is None else torch.randint(0, 50, (ranks,), generator=g)
    return Placement.from_phy2log(phy2log[None], experts, ranks), ids, rank_load


def _rank_counts(slots, p):
    return torch.bincount(slots // p.slots_per_rank, minlength=p.num_ranks)


@settings(max_examples=150, deadline=None)
@given(case=steps(), rounds=st.integers(1, 3))
def test_every_pair_goes_to_a_slot_of_its_expert(case, rounds):
    p, ids, rank_load = case
    slots = water_fill_slots(ids, p.log2phy[0], p.replica_count[0], p.slots_per_rank, p.num_ranks,
                             rank_load=rank_load, rounds=rounds)
    assert slots.shape == ids.shape and slots.dtype == torch.long
    assert torch.equal(p.phy2log[0][slots], ids)
    # the split of each expert's pairs over its replicas sums to its pairs
    per_slot = torch.bincount(slots, minlength=p.num_physical)
    per_expert = torch.zeros(p.num_experts, dtype=torch.long).scatter_add_(0, p.phy2log[0], per_slot)
    assert torch.equal(per_expert, torch.bincount(ids, minlength=p.num_experts))


@settings(max_examples=150, deadline=None)
@given(case=steps())
def test_one_replicated_expert_is_water_filled_to_within_one_pair_of_the_optimum(case):
    p, ids, rank_load = case
    e = int(p.replica_count[0].argmax())
    ids = ids[(ids == e) | (p.replica_count[0][ids] == 1)]  # only e has replicas among the pairs
    slots = water_fill_slots(ids, p.log2phy[0], p.replica_count[0], p.slots_per_rank, p.num_ranks,
                             rank_load=rank_load, rounds=1)
    base = torch.zeros(p.num_ranks, dtype=torch.long) if rank_load is None else rank_load.clone()
    fixed = ids[ids != e]
    base += _rank_counts(p.log2phy[0][fixed, 0], p)
    got = base + _rank_counts(slots[ids == e], p)
    # the integer optimum for e's ranks: one pair at a time to the lightest of e's replica ranks
    opt = base.clone()
    holders = p.log2phy[0][e][: p.replica_count[0][e]] // p.slots_per_rank
    for _ in range(int((ids == e).sum())):
        r = holders[opt[holders].argmin()]
        opt[r] += 1
    assert int(got[holders].max()) <= int(opt[holders].max()) + 1


def test_water_filling_beats_the_static_split_on_a_skewed_step():
    # Expert 0 on ranks 0 and 1; rank 0 already carries 30 pairs of expert 1.
    p = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2]]), 3, 2)
    ids = torch.tensor([1] * 30 + [0] * 40 + [2] * 10)
    static = static_slots(ids, p.log2phy[0], p.replica_count[0])
    aware = water_fill_slots(ids, p.log2phy[0], p.replica_count[0], 2, 2)
    assert _rank_counts(static, p).tolist() == [50, 30]
    assert _rank_counts(aware, p).tolist() == [40, 40]


def test_no_data_dependent_shapes_or_host_reads():
    # Meta tensors have no data: any .item(), bool() or data-dependent shape would raise.
    p = Placement.from_phy2log(torch.tensor([[0, 1, 0, 2, 1, 2]]), 3, 3)
    ids = torch.empty(64, dtype=torch.long, device="meta")
    out = water_fill_slots(ids, p.log2phy[0].to("meta"), p.replica_count[0].to("meta"), 2, 3,
                           rank_load=torch.empty(3, device="meta"))
    assert out.shape == (64,) and out.device.type == "meta"
