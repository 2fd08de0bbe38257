"""Move expert weights between EP ranks for one layer of a rebalance plan.

Moving an expert means moving row ``s`` of EVERY tensor in ``layer.expert_tensors()`` (weights
and, for block-FP8, their scales), so nothing derived from a moved expert is left stale.

A layer is moved in two phases so the old placement stays usable until every rank is ready:
``stage_layer`` receives the incoming rows into staging buffers (and copies local rows the same
way) while the live tensors stay untouched (the old owners may still be sending from them, and
the forward pass still reads them); ``commit_layer`` then writes the staged rows in place. Sync
mode calls both back to back (the staging is the temporary of an in-place move); async mode
stages on a worker thread and commits on the main thread at a step boundary.

Rows travel as raw bytes, so any dtype (float8 included) works on gloo and NCCL alike; between
each pair of ranks, one message per tensor name carries all rows of that layer, in plan order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class StagedLayer:
    """Incoming rows of one layer on one rank: ``rows[name][i]`` goes to local slot ``dst_local[i]``."""

    layer_idx: int
    dst_local: torch.Tensor  # LongTensor[n]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, *row_shape]
    bytes_received: int = 0  # bytes that came from other ranks (local copies excluded)


def row_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert as stored: one row of every per-slot tensor."""
    return sum(t[0].numel() * t.element_size() for t in tensors.values())


def plan_bytes(transfers: Sequence, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes moved by one layer's transfers (every copy counted once, local copies included)."""
    return len(transfers) * row_bytes(tensors)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def stage_layer(
    layer_idx: int,
    transfers: Sequence,
    rank: int,
    tensors: dict[str, torch.Tensor],
    slots_per_rank: int,
    group: dist.ProcessGroup | None,
) -> StagedLayer:
    """Run this rank's part of one layer's transfers; return the rows it must commit.

    ``transfers``: the planner's ``Transfer(src_rank, src_slot, dst_rank, dst_slot, expert)``
    list for the layer (global slots), identical on every rank. ``tensors``: the layer's
    ``expert_tensors()`` (leading dim = ``slots_per_rank``). Blocks until this rank's sends and
    receives are done (a peer that never shows up raises after the group's timeout).
    """
    base = rank * slots_per_rank
    names = sorted(tensors)
    incoming = [t for t in transfers if t.dst_rank == rank]
    dst_local = torch.tensor([t.dst_slot - base for t in incoming], dtype=torch.long)
    # staging[name] : [n_in, *row_shape], filled by local copies and receives below
    staging = {
        n: torch.empty((len(incoming),) + tuple(tensors[n].shape[1:]), dtype=tensors[n].dtype,
                       device=tensors[n].device)
        for n in names
    }
    ops: list[dist.P2POp] = []
    recv_views: list[tuple[torch.Tensor, str, torch.Tensor]] = []
    peers = sorted({t.src_rank for t in transfers} | {t.dst_rank for t in transfers})
    received = 0
    for peer in peers:
        if peer == rank:
            for i, t in enumerate(incoming):
                if t.src_rank == rank:
                    for n in names:
                        staging[n][i] = tensors[n][t.src_slot - base]
            continue
        out_rows = torch.tensor(
            [t.src_slot - base for t in transfers if t.src_rank == rank and t.dst_rank == peer],
            dtype=torch.long,
        )
        in_idx = torch.tensor(
            [i for i, t in enumerate(incoming) if t.src_rank == peer], dtype=torch.long
        )
        for tag, n in enumerate(names):
            if out_rows.numel():
                payload = _as_bytes(tensors[n].index_select(0, out_rows.to(tensors[n].device)))
                ops.append(dist.P2POp(dist.isend, payload, peer, group, tag))
            if in_idx.numel():
                buf = torch.empty(
                    in_idx.numel() * tensors[n][0].numel() * tensors[n].element_size(),
                    dtype=torch.uint8, device=tensors[n].device,
                )
                ops.append(dist.P2POp(dist.irecv, buf, peer, group, tag))
                recv_views.append((buf, n, in_idx))
                received += buf.numel()
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for buf, n, in_idx in recv_views:
        rows = buf.view(tensors[n].dtype).view((in_idx.numel(),) + tuple(tensors[n].shape[1:]))
        staging[n][in_idx.to(rows.device)] = rows
    return StagedLayer(layer_idx, dst_local, staging, received)


def commit_layer(tensors: dict[str, torch.Tensor], staged: StagedLayer) -> None:
    """Write the staged rows in place (call only once every rank has staged this layer)."""
    if not staged.dst_local.numel():
        return
    for n, rows in staged.rows.items():
        tensors[n][staged.dst_local.to(rows.device)] = rows
        if rows.is_cuda:  # staged on the async worker's stream, read here on the current one
            rows.record_stream(torch.cuda.current_stream(rows.device))
