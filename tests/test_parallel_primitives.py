"""The runtime's collective building blocks on 2 and 4 gloo ranks, in one spawn per world size:

- expert transfer: after staging + commit every slot holds the rows of the expert the new
  placement names, for every per-slot tensor (float8 scales included), for random old and new
  placements;
- EP dispatchers: every backend gives BIT-identical outputs to the in-process dispatcher run on
  all ranks' tokens at once (uneven token counts, a rank with none, replicas), and so does
  ``allgather_reducescatter``'s static (CUDA-graph) path on padded batches; ``alltoall``
  sends a token once per destination rank even when several of its experts live there.

The ``alltoall`` send plan is also checked on its own (no processes) with hypothesis."""

from __future__ import annotations

import time
import traceback
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_helpers import spawn_ranks
from eplb.balancer.placement import Placement
from eplb.balancer.planner import plan
from eplb.config import ALL2ALL_BACKENDS
from eplb.model.moe import expert_forward, local_dispatch
from eplb.parallel import all2all
from eplb.parallel.all2all import make_dispatcher, plan_sends, routed_ranks
from eplb.parallel.groups import init_distributed
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
        checked += _check_static_path(rank, world, ctx, counts, (x, slots, w), want, w13, w2,
                                      mine, trial)
    return checked + _check_token_dedup(rank, world, ctx, gen, w13, w2, s)


def _check_static_path(rank: int, world: int, ctx, counts, batch, want, w13, w2,
                       mine: _Layer, trial: int) -> int:
    """The CUDA-graph path of ``allgather_reducescatter``: every rank passes exactly t rows (its
    real rows, then padding rows with real slots, as the padded decode does; a rank with no
    tokens passes only padding) and its real-row count as a tensor; the real rows come back
    bit-identical, the padding rows as zeros (no rank computed them)."""
    x, slots, w = batch
    t = int(counts.max()) + 1 + trial % 2  # the agreed size: >= every rank's rows
    own = int(counts[rank])
    lo = int(counts[:rank].sum())
    pad = t - own
    num_physical = w13.shape[0]
    gen = torch.Generator().manual_seed(1000 * trial + rank)  # the shared one stays in step
    xs = torch.cat([x[lo:lo + own], torch.randn(pad, x.shape[1], generator=gen)])
    ss = torch.cat([slots[lo:lo + own], torch.randint(0, num_physical, (pad, slots.shape[1]),
                                                      generator=gen)])
    ws = torch.cat([w[lo:lo + own], torch.rand(pad, w.shape[1], generator=gen)])
    dispatcher = make_dispatcher("allgather_reducescatter", ctx.ep_group, world, "cpu")
    dispatcher.begin_step()
    dispatcher.begin_static_step(t, torch.tensor(own))
    got = dispatcher(xs, ss, ws, _experts((w13, w2), None, mine), mine)
    dispatcher.end_static_step()
    assert got.shape == (t, x.shape[1])
    assert torch.equal(got[:own], want[lo:lo + own]), ("static", trial)
    assert not got[own:].any(), ("static padding", trial)
    return 1


def _experts(ws, scale: torch.Tensor, layer: _Layer):
    """expert_fn over the slots ``layer`` holds: SwiGLU experts ``ws = (w13, w2)``, or with
    ``ws`` None a per-slot ``scale [P, 1]`` (for a dtype the grouped GEMM lacks)."""
    held = slice(layer.slot_start, layer.slot_end)
    if ws is None:
        return lambda a, b: a * scale[b + layer.slot_start]
    return lambda a, b: expert_forward(a, b, ws[0][held], ws[1][held])


def _check_token_dedup(rank: int, world: int, ctx, gen, w13, w2, s: int) -> int:
    """top-3 routing where most tokens have several experts on one rank: ``alltoall`` sends
    one row per distinct (token, destination rank), not per pair, and stays bit-identical, for
    float32, bf16 (slot ids in 2-byte units) and float64 rows (8-byte units; the grouped GEMM
    has no float64, so there the experts are a per-slot scale). Returns the batches checked."""
    top_k, num_physical = 3, w13.shape[0]
    full = _Layer(0, num_physical, num_physical)
    mine = _Layer(rank * s, (rank + 1) * s, num_physical)
    scale = torch.arange(1, num_physical + 1, dtype=torch.float64).unsqueeze(1) / 7
    experts = {
        torch.float32: (w13, w2),
        torch.bfloat16: (w13.to(torch.bfloat16), w2.to(torch.bfloat16)),
        torch.float64: None,
    }
    for trial, (dtype, ws) in enumerate(experts.items()):
        counts = torch.randint(1, 7, (world,), generator=gen)
        counts[1] = 0 if trial == 1 else counts[1]  # a rank with no tokens still joins
        total = int(counts.sum())
        home = torch.randint(0, world, (total, 1), generator=gen)
        slots = home * s + torch.randint(0, s, (total, top_k), generator=gen)
        slots[::3, 2] = torch.randint(0, num_physical, (len(range(0, total, 3)),), generator=gen)
        x = torch.randn(total, w13.shape[2], generator=gen).to(dtype)
        w = torch.rand(total, top_k, generator=gen).to(dtype)
        want = local_dispatch(x, slots, w, _experts(ws, scale, full), full)
        lo = int(counts[:rank].sum())
        rows = slice(lo, lo + int(counts[rank]))
        dispatcher = make_dispatcher("alltoall", ctx.ep_group, world, "cpu")
        got = dispatcher(x[rows], slots[rows], w[rows], _experts(ws, scale, mine), mine)
        assert got.dtype == dtype and torch.equal(got, want[rows]), trial
        dest = torch.div(slots[rows], s, rounding_mode="floor")
        distinct = sum(len(set(r)) for r in dest.tolist())
        assert dispatcher.last_rows_sent == distinct, (dispatcher.last_rows_sent, distinct)
        assert dispatcher.last_pairs_sent == int(counts[rank]) * top_k
        if counts[rank]:  # every token has >= 2 of its 3 slots on its home rank
            assert dispatcher.last_rows_sent < int(counts[rank]) * top_k
    return len(experts)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.data())
def test_send_plan_sends_each_token_once_per_rank(world, top_k, data):
    """Every (token, rank) pair that some slot routes to is sent exactly once, grouped by rank
    and in token order within a rank; the per-rank counts (the splits) sum to the rows."""
    num_tokens = data.draw(st.integers(0, 12))
    dest = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, world - 1), min_size=top_k,
                                                    max_size=top_k),
                                           min_size=num_tokens, max_size=num_tokens)),
                        dtype=torch.long).view(num_tokens, top_k)
    hit = routed_ranks(dest, world)
    splits = hit.sum(0).tolist()
    plan = plan_sends(hit, sum(splits))
    sent = list(zip(plan.dest.tolist(), plan.token.tolist()))
    want = sorted({(g, t) for t, row in enumerate(dest.tolist()) for g in row})
    assert sent == want  # each pair once, rank-major, tokens ascending
    assert [plan.dest.tolist().count(g) for g in range(world)] == splits
    assert sum(splits) == len(sent) <= num_tokens * min(top_k, world)
    with mock.patch.object(all2all, "_nonzero_static", None):  # torch without nonzero_static
        fallback = plan_sends(hit, sum(splits))
    assert torch.equal(fallback.token, plan.token) and torch.equal(fallback.dest, plan.dest)


@pytest.mark.parametrize("world", [2, 4])
def test_transfers_and_dispatchers(world):
    results = spawn_ranks(_worker, world, timeout_s=240)
    for rank, checked, moved, dispatched, err in results:
        assert err is None, f"rank {rank}:\n{err}"
        assert checked == 12 * LAYERS and moved > 0
        assert dispatched == 6 * len(ALL2ALL_BACKENDS) + 6 + 3
