"""Expert transfer between ranks (gloo): after staging + commit every slot holds the rows of the
expert the new placement names, for every per-slot tensor (float8 scales included), whatever the
random old and new placements."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eplb.balancer.placement import Placement
from eplb.balancer.planner import plan
from eplb.parallel.groups import find_free_port, init_distributed
from eplb.parallel.transfer import commit_layer, plan_bytes, row_bytes, stage_layer

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
        result_q.put((rank, checked, moved, None))
    except BaseException:  # noqa: BLE001
        result_q.put((rank, 0, 0, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_random_plans_move_every_tensor_row(world):
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
    for rank, checked, moved, err in results:
        assert err is None, f"rank {rank}:\n{err}"
        assert checked == 12 * LAYERS and moved > 0
