"""The packed EPLB layer transfer (``parallel/transfer.py``, ``parallel/packing.py``).

In-process: the packed-row layout, the staging pool, and a layer moved by local copies only.
On 3 gloo ranks (one spawn): random plans over tensors of random BYTES (float32, bf16, float8,
an odd row size, a non-contiguous tensor) land bit for bit, so rows of different tensor names
or different peers cannot be mixed up unnoticed; every rank posts exactly one send and one
receive per peer and layer, whatever the number of tensor names; two layers in flight at once
never share a buffer and a committed layer's buffer is reused; a single-name layer whose rows
for a peer are consecutive slots is sent from a view of the live tensor.
"""

from __future__ import annotations

import traceback
from collections import Counter
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from dist_helpers import spawn_ranks
from eplb.balancer.planner import Transfer
from eplb.parallel.groups import init_distributed
from eplb.parallel.packing import ALIGN, StagingPool, byte_rows, row_layout
from eplb.parallel.transfer import (
    commit_layer,
    plan_bytes,
    row_bytes,
    stage_layer,
    start_layer_transfer,
)

WORLD, SLOTS = 3, 5


def random_tensors(seed: int, slots: int = SLOTS) -> dict[str, torch.Tensor]:
    """Per-slot tensors of random bytes: rows differ in size and dtype (float8 among them; the
    bytes include NaN patterns, so only a byte comparison is exact)."""
    g = torch.Generator().manual_seed(seed)

    def raw(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = torch.empty((), dtype=dtype).element_size()
        n = slots * size * int(torch.tensor(shape).prod())
        return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype) \
            .view((slots,) + shape)

    # "odd": 3-byte rows (words of 1 byte, padding in the packed row); "strided": a transposed
    # view, so neither reading nor writing can use its bytes as rows directly
    return {
        "w13": raw((4, 6), torch.float32),
        "w2": raw((6, 2), torch.bfloat16),
        "w13_scale": raw((2, 3), torch.float8_e4m3fn),
        "odd": raw((3,), torch.uint8),
        "strided": raw((5, 2), torch.float32).transpose(1, 2),
    }


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(a[k].dtype == b[k].dtype and torch.equal(byte_rows(a[k]), byte_rows(b[k]))
               for k in a)


def random_plan(seed: int, world: int, slots: int) -> list[Transfer]:
    """A random subset of destination slots, each fed from a random old slot anywhere (the
    same source may feed several slots, on one rank or several): every kind of pair."""
    g = torch.Generator().manual_seed(seed)
    total = world * slots
    dsts = torch.randperm(total, generator=g)[:int(torch.randint(1, total + 1, (1,),
                                                                 generator=g))]
    out = []
    for dst in dsts.tolist():
        src = int(torch.randint(0, total, (1,), generator=g))
        if src != dst:
            out.append(Transfer(src // slots, src, dst // slots, dst, src))
    return out


def expected(before: list[dict[str, torch.Tensor]], plan: list[Transfer], rank: int,
             slots: int) -> dict[str, torch.Tensor]:
    want = {k: v.clone() for k, v in before[rank].items()}
    for t in plan:
        if t.dst_rank == rank:
            for k in want:
                want[k][t.dst_slot - rank * slots] = before[t.src_rank][k][t.src_slot % slots]
    return want


# ----- in process --------------------------------------------------------------------------
def test_row_layout_aligns_every_name():
    tensors = random_tensors(0)
    layout = row_layout(tensors)
    assert layout.names == tuple(sorted(tensors))
    assert all(o % ALIGN == 0 for o in layout.offsets) and layout.stride % ALIGN == 0
    assert layout.payload == row_bytes(tensors) == 4 * 6 * 4 + 6 * 2 * 2 + 2 * 3 + 3 + 5 * 2 * 4
    for a, b in zip(layout.offsets, layout.offsets[1:] + (layout.stride,)):
        assert b - a >= layout.sizes[layout.offsets.index(a)]  # no overlap
    assert plan_bytes([None] * 3, tensors) == 3 * layout.payload


def test_pool_reuses_and_grows():
    pool = StagingPool()
    a = pool.acquire(100, torch.device("cpu"))
    b = pool.acquire(100, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr() and pool.allocations == 2  # both held: two buffers
    pool.release(a)
    assert pool.acquire(80, torch.device("cpu")) is a and pool.allocations == 2
    pool.release(a)
    pool.release(a)  # a double release must not hand it out twice
    c = pool.acquire(1000, torch.device("cpu"))  # too small: dropped, a bigger one made
    assert c.numel() >= 1000 and pool.allocations == 3
    assert pool.acquire(10, torch.device("cpu")) is not c
    # several free buffers of different sizes: the smallest that fits, the others stay free
    pool = StagingPool()
    bufs = [pool.acquire(n, torch.device("cpu")) for n in (300, 100, 200)]
    for b in bufs:
        pool.release(b)
    assert pool.acquire(150, torch.device("cpu")) is bufs[2]
    assert pool.acquire(50, torch.device("cpu")) is bufs[1]
    assert pool.acquire(400, torch.device("cpu")).numel() == 400  # drops the 300 one
    assert pool.allocations == 4 and not pool._free


def test_local_only_layer_is_bit_exact():
    """World of one, no process group: a permutation with a duplicated source."""
    before = random_tensors(1)
    tensors = {k: v.clone() for k, v in before.items()}
    perm = [3, 0, 0, 4, 1]  # slot s receives old slot perm[s]
    plan = [Transfer(0, perm[s], 0, s, perm[s]) for s in range(SLOTS) if perm[s] != s]
    pool = StagingPool()
    pending = start_layer_transfer(0, plan, 0, tensors, SLOTS, None, pool=pool)
    assert pending.done() and same_bytes(tensors, before)  # live rows untouched until commit
    staged = pending.finish()
    assert staged.messages == 0 and staged.bytes_received == 0
    commit_layer(tensors, staged)
    assert same_bytes(tensors, expected([before], plan, 0, SLOTS))
    assert pool.allocations == 1 and pool.acquire(1, torch.device("cpu")) is not None


# ----- 3 gloo ranks ------------------------------------------------------------------------
class _Recorder:
    """Wraps ``dist.batch_isend_irecv``: every op posted, as (isend|irecv, peer, bytes, ptr)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int, int, int]]] = []
        self._real = dist.batch_isend_irecv

    def __call__(self, ops):
        self.calls.append([("send" if op.op is dist.isend else "recv", op.peer,
                            op.tensor.numel() * op.tensor.element_size(), op.tensor.data_ptr())
                           for op in ops])
        return self._real(ops)


def _worker(rank: int, world: int, port: int, q) -> None:
    try:
        torch.set_num_threads(1)
        ctx = init_distributed(rank, world, address="127.0.0.1", port=port)
        rec = _Recorder()
        with mock.patch.object(dist, "batch_isend_irecv", rec):
            n = _check_random_plans(rank, world, ctx, rec)
            _check_two_layers_in_flight(rank, world, ctx)
            _check_view_send(rank, world, ctx, rec)
        q.put((rank, n, None))
    except BaseException:  # noqa: BLE001
        q.put((rank, 0, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_random_plans(rank: int, world: int, ctx, rec: _Recorder) -> int:
    checked = 0
    for trial in range(20):
        before = [random_tensors(100 * trial + r) for r in range(world)]
        tensors = {k: v.clone() for k, v in before[rank].items()}
        plan = random_plan(trial, world, SLOTS)
        rec.calls.clear()
        staged = stage_layer(trial, plan, rank, tensors, SLOTS, ctx.transfer_group)
        assert same_bytes(tensors, before[rank])  # staging leaves the live rows alone
        dist.barrier()
        commit_layer(tensors, staged)
        assert same_bytes(tensors, expected(before, plan, rank, SLOTS)), trial
        # one send and one receive per peer, each carrying all of that pair's rows
        ops = [op for call in rec.calls for op in call]
        assert len(rec.calls) <= 1
        payload = row_bytes(tensors)
        stride = row_layout(tensors).stride
        for peer in range(world):
            if peer == rank:
                continue
            n_out = sum(1 for t in plan if t.src_rank == rank and t.dst_rank == peer)
            n_in = sum(1 for t in plan if t.src_rank == peer and t.dst_rank == rank)
            kinds = Counter(kind for kind, p, _, _ in ops if p == peer)
            assert kinds == Counter({"send": int(n_out > 0), "recv": int(n_in > 0)}), kinds
            assert [b for kind, p, b, _ in ops if p == peer and kind == "send"] == (
                [n_out * stride] if n_out else [])
            assert [b for kind, p, b, _ in ops if p == peer and kind == "recv"] == (
                [n_in * stride] if n_in else [])
        assert staged.messages == len(ops)
        assert staged.bytes_received == payload * sum(
            1 for t in plan if t.dst_rank == rank and t.src_rank != rank)
        checked += 1
    return checked


def _check_two_layers_in_flight(rank: int, world: int, ctx) -> None:
    """Two layers posted before either commits (as async EPLB does): separate buffers, both
    right; once they are committed the next layer reuses a buffer instead of allocating."""
    pool = StagingPool()
    before = [[random_tensors(7000 + 10 * layer + r) for r in range(world)] for layer in (0, 1)]
    live = [{k: v.clone() for k, v in before[layer][rank].items()} for layer in (0, 1)]
    # every slot moves to the next rank: all rows cross, both ways, on every pair
    total = world * SLOTS
    plan = [Transfer(s // SLOTS, s, ((s + SLOTS) % total) // SLOTS, (s + SLOTS) % total, s)
            for s in range(total)]
    pending = [start_layer_transfer(layer, plan, rank, live[layer], SLOTS, ctx.transfer_group,
                                    pool=pool) for layer in (0, 1)]
    bufs = [p._staged.buffer for p in pending]
    lo = [b.data_ptr() for b in bufs]
    hi = [b.data_ptr() + b.numel() for b in bufs]
    assert hi[0] <= lo[1] or hi[1] <= lo[0], "two layers in flight share a buffer"
    for p in pending:
        p.wait(30)
    dist.barrier()
    for layer, p in enumerate(pending):
        commit_layer(live[layer], p.finish())
        assert same_bytes(live[layer], expected(before[layer], plan, rank, SLOTS))
    made = pool.allocations
    again = start_layer_transfer(2, plan, rank, live[0], SLOTS, ctx.transfer_group, pool=pool)
    again.wait(30)
    assert pool.allocations == made, "a committed layer's buffer was not reused"
    dist.barrier()
    commit_layer(live[0], again.finish())


def _check_view_send(rank: int, world: int, ctx, rec: _Recorder) -> None:
    """One tensor name, every slot to the next rank (consecutive slots): the send is a view of
    the live tensor, the rows still land bit for bit."""
    before = [{"w": random_tensors(9000 + r)["w13"]} for r in range(world)]
    live = {"w": before[rank]["w"].clone()}
    total = world * SLOTS
    plan = [Transfer(s // SLOTS, s, ((s + SLOTS) % total) // SLOTS, (s + SLOTS) % total, s)
            for s in range(total)]
    rec.calls.clear()
    staged = stage_layer(3, plan, rank, live, SLOTS, ctx.transfer_group)
    sends = [op for call in rec.calls for op in call if op[0] == "send"]
    assert len(sends) == 1 and sends[0][3] == live["w"].data_ptr(), "the send was gathered"
    dist.barrier()
    commit_layer(live, staged)
    assert same_bytes(live, expected(before, plan, rank, SLOTS))


@pytest.mark.parametrize("world", [WORLD])
def test_packed_transfers_on_gloo(world):
    results = spawn_ranks(_worker, world, timeout_s=180)
    for rank, checked, err in results:
        assert err is None, f"rank {rank}:\n{err}"
        assert checked == 20
