"""The runtime's collective building blocks on 2 and 4 gloo ranks, in one spawn per world size:

- expert transfer: after staging + commit every slot holds the rows of the expert the new
  placement names, for every per-slot tensor (float8 scales included), for random old and new
  placements;
- EP dispatchers: both backends give BIT-identical outputs to the in-process dispatcher run on
  all ranks' tokens at once (uneven token counts, a rank with none, replicas)."""

from __future__ import annotations

import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.balancer.placement import Placement
from eplb.balancer.planner import plan
from eplb.config import ALL2ALL_BACKENDS
from eplb.model.moe import expert_forward, local_dispatch
from eplb.parallel.all2all import make_dispatcher
from eplb.parallel.groups import find_free_port, init_distributed
from eplb.parallel.transfer import (
    commit_layer,
    plan_bytes,
    row_bytes,
    stage_layer,
    start_layer_transfer,
)

LAYERS, EXPERTS = 3, 8


def identity_rows(expert: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """Rows that say which (layer, expert) they belong to, in three dtypes."""
    e = expert.view(-1, 1, 1).float()
    return {
        "w13": (e * 10 + layer + torch.arange(6).view(1, 2, 3)).float(),
        "w2": (e + layer).to(torch.bfloat16).expand(-1, 3, 2).contiguous(),
        # block-FP8 scales: small integers are exact in e4m3
        "w13_scale": (e[:, :, 0] + layer).expand(-1, 2).to(torch.float8_e4m3fn).contiguous(),
    }


def random_placement(gen: torch.Generator, world: int, redundant: int) -> Placement:
    rows = []
    for _ in range(LAYERS):
        extra = torch.randint(0, EXPERTS, (redundant,), generator=gen)
        row = torch.cat([torch.arange(EXPERTS), extra])
        rows.append(row[torch.randperm(row.numel(), generator=gen)])
    return Placement.from_phy2log(torch.stack(rows), EXPERTS, world)


def _worker(rank: int, world: int, port: int, result_q) -> None:
    try:
        torch.set_num_threads(1)
        ctx = init_distributed(rank, world, address="127.0.0.1", port=port)
        gen = torch.Generator().manual_seed(1234)  # same placements on every rank
        checked = moved = 0
        for trial in range(12):
            redundant = world * (trial % 3)
            old = random_placement(gen, world, redundant)
            new = random_placement(gen, world, redundant)
            s = old.slots_per_rank
            mine = slice(rank * s, (rank + 1) * s)
            tensors = [identity_rows(old.phy2log[layer, mine], layer) for layer in range(LAYERS)]
            transfers = plan(old, new)
            for layer in range(LAYERS):
                staged = stage_layer(layer, transfers[layer], rank, tensors[layer], s,
                                     ctx.transfer_group)
                # staging leaves the live rows alone until commit
                want_old = identity_rows(old.phy2log[layer, mine], layer)
                assert all(torch.equal(tensors[layer][k].float(), want_old[k].float())
                           for k in want_old)
                dist.barrier()  # as the runtime does: commit only when every rank has staged
                commit_layer(tensors[layer], staged)
                want = identity_rows(new.phy2log[layer, mine], layer)
                for k in want:
                    assert tensors[layer][k].dtype == want[k].dtype
                    assert torch.equal(tensors[layer][k].float(), want[k].float()), (trial, k)
                checked += 1
                moved += len(transfers[layer])
                assert plan_bytes(transfers[layer], tensors[layer]) == (
                    len(transfers[layer]) * row_bytes(tensors[layer]))
        _check_posting_never_blocks(rank, world, ctx)
        dispatched = _check_dispatchers(rank, world, ctx)
        result_q.put((rank, checked, moved, dispatched, None))
    except BaseException:  # noqa: BLE001
        result_q.put((rank, 0, 0, 0, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_posting_never_blocks(rank: int, world: int, ctx) -> None:
    """The async runtime posts a layer at a boundary and polls it later: posting returns at once
    and ``done()`` stays False while a peer has not posted its side (here rank 0 posts 0.5 s
    before the others), then turns True and the rows are right."""
    old = Placement.default(1, EXPERTS, world, 0)
    s = old.slots_per_rank
    new = Placement.from_phy2log(old.phy2log.roll(s, dims=1), EXPERTS, world)  # all remote
    mine = slice(rank * s, (rank + 1) * s)
    tensors = identity_rows(old.phy2log[0, mine], 0)
    if rank != 0:
        time.sleep(0.5)
    pending = start_layer_transfer(0, plan(old, new)[0], rank, tensors, s, ctx.transfer_group)
    if rank == 0:
        assert not pending.done(), "rank 0's receive finished before its peer posted"
    deadline = time.monotonic() + 30
    while not pending.done():
        assert time.monotonic() < deadline, "a posted transfer never completed"
        time.sleep(0.01)
    dist.barrier()
    commit_layer(tensors, pending.finish())
    want = identity_rows(new.phy2log[0, mine], 0)
    assert all(torch.equal(tensors[k].float(), want[k].float()) for k in want)


class _Layer:
    """What a dispatcher reads from the MoE layer."""

    expert_fn = None  # not a real layer: the dispatchers must use the expert_fn they are given

    def __init__(self, start: int, end: int, num_physical: int) -> None:
        self.slot_start, self.slot_end, self.num_physical = start, end, num_physical

    def use_fused(self, hidden: torch.Tensor) -> bool:
        return False


def _check_dispatchers(rank: int, world: int, ctx) -> int:
    """Random batches through both EP dispatchers == the in-process dispatcher on the
    concatenation of every rank's tokens (bitwise); returns the number of batches checked."""
    gen = torch.Generator().manual_seed(99)
    hidden, inter, top_k = 16, 8, 2
    num_physical = EXPERTS + world
    s = num_physical // world
    phy2log = torch.cat([torch.arange(EXPERTS), torch.arange(world) % EXPERTS])
    w13_e = torch.randn(EXPERTS, 2 * inter, hidden, generator=gen)
    w2_e = torch.randn(EXPERTS, hidden, inter, generator=gen)
    w13, w2 = w13_e[phy2log], w2_e[phy2log]  # replicas hold identical weights
    full = _Layer(0, num_physical, num_physical)
    mine = _Layer(rank * s, (rank + 1) * s, num_physical)
    checked = 0
    for trial in range(6):
        counts = torch.randint(0, 9, (world,), generator=gen)
        counts[trial % world] = 0 if trial % 2 else counts[trial % world]  # a rank with none
        total = int(counts.sum())
        x = torch.randn(total, hidden, generator=gen)
        slots = torch.randint(0, num_physical, (total, top_k), generator=gen)
        w = torch.rand(total, top_k, generator=gen)
        want = local_dispatch(x, slots, w, lambda a, b: expert_forward(a, b, w13, w2), full)
        lo = int(counts[:rank].sum())
        rows = slice(lo, lo + int(counts[rank]))
        for backend in ALL2ALL_BACKENDS:
            dispatcher = make_dispatcher(backend, ctx.ep_group, world, "cpu")
            got = dispatcher(x[rows], slots[rows], w[rows],
                             lambda a, b: expert_forward(a, b, w13[mine.slot_start:mine.slot_end],
                                                         w2[mine.slot_start:mine.slot_end]),
                             mine)
            assert torch.equal(got, want[rows]), (backend, trial)
            checked += 1
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_transfers_and_dispatchers(world):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    for rank, checked, moved, dispatched, err in results:
        assert err is None, f"rank {rank}:\n{err}"
        assert checked == 12 * LAYERS and moved > 0
        assert dispatched == 6 * len(ALL2ALL_BACKENDS)
