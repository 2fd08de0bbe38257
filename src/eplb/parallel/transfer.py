"""Move expert weights between EP ranks for one layer of a rebalance plan.

Moving an expert means moving row ``s`` of EVERY tensor in ``layer.expert_tensors()`` (weights
and, for block-FP8, their scales), so nothing derived from a moved expert is left stale.

A layer is moved in two phases so the old placement stays usable until every rank is ready:
``start_layer_transfer`` posts this rank's sends and receives (and copies local rows into
staging) and returns at once with a ``PendingLayer``; the live tensors stay untouched (the old
owners may still be sending from them, and the forward pass still reads them). ``commit_layer``
then writes the staged rows in place. Sync mode finishes each layer before the next
(``stage_layer``); async mode posts a layer at a step boundary, polls ``done()`` at later
boundaries and commits once every rank reported it done.

Posting is the only step that enqueues communication, and the caller does it from the rank's
main thread (docs/runtime.md says why). What runs in the background never enqueues anything:
on CUDA the receives complete on a side stream (polled with an event); on gloo, whose P2P works
report completion only through ``wait()``, a daemon thread waits on the already-posted works.

Messages and copies, per layer and rank (``packing.py`` has the byte layout):
- one byte buffer (from a grow-only ``StagingPool``, held until the layer is committed; between
  rebalances the pool keeps up to its ``max_free`` buffers, the memory a rebalance peaks at) of
  packed rows: an expert's rows of every tensor name side by side in one row. Its first rows
  are the staging (incoming rows grouped by source rank), the rest the outgoing rows grouped by
  destination rank;
- ONE send and ONE receive per peer: each is a contiguous block of packed rows, so a layer of
  w13, w2 (and FP8 scales) is one message each way, whatever the number of tensor names. Rows
  travel as raw bytes, so any dtype (float8 included) works on gloo and NCCL alike. Between two
  ranks rows are in plan order;
- the outgoing rows are gathered straight into the buffer, one index_select per tensor name for
  all peers at once, on 8-byte words (an index kernel moves one element per thread and step:
  the local copies used to move single bytes, the sends 2-byte bf16 into fresh buffers). A layer
  with a single tensor name whose rows for a peer are a run of consecutive slots is sent from a
  view of the live tensor without a gather. (With several names a view cannot be one message,
  and one gather of the layer costs less than a message per name);
- on CUDA the P2P ops are enqueued right after the gather, and the local copies (rows a rank
  moves between its own slots) only after them, so local copies overlap the transfer;
- ``commit_layer``: one index_copy_ per tensor name, from the staging rows into the live slots.
  Staging cannot be skipped: the live rows must stay intact until every rank has its copy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eplb.parallel.packing import (
    RowLayout,
    StagingPool,
    byte_rows,
    gather_into,
    pool_for,
    row_layout,
    scatter_from,
)


@dataclass
class StagedLayer:
    """Incoming rows of one layer on one rank: packed row ``i`` goes to local slot
    ``dst_local[i]``."""

    layer_idx: int
    dst_local: torch.Tensor  # LongTensor[n] on the CPU
    packed: torch.Tensor  # uint8 [n, layout.stride]: the staging rows
    layout: RowLayout
    bytes_received: int = 0  # bytes that came from other ranks (local copies excluded)
    messages: int = 0  # point-to-point ops (sends + receives) this rank posted for the layer
    dst_index: torch.Tensor | None = None  # dst_local on the rows' device, uploaded at posting
    buffer: torch.Tensor | None = None  # the pooled buffer behind ``packed`` (back at commit)
    pool: StagingPool | None = None


def row_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert as stored: one row of every per-slot tensor."""
    return row_layout(tensors).payload


def plan_bytes(transfers: Sequence, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes moved by one layer's transfers (every copy counted once, local copies included)."""
    return len(transfers) * row_bytes(tensors)


def _runs(keys: list[int]) -> dict[int, tuple[int, int]]:
    """Sorted keys -> {key: (first index, end index)} of its run."""
    out: dict[int, tuple[int, int]] = {}
    for i, k in enumerate(keys):
        out[k] = (out[k][0] if k in out else i, i + 1)
    return out


@dataclass
class _RankPlan:
    """One rank's part of a layer's transfers, in the packed buffer's row order."""

    dst_local: list[int]  # staging row i -> local slot
    recv: dict[int, tuple[int, int]]  # source rank -> its staging rows (self: local copies)
    local_src: list[int]  # local slots the local copies read, for recv[rank]'s rows
    send: dict[int, tuple[int, int]]  # destination peer -> its rows in the outgoing block
    send_src: list[int]  # local slots of the outgoing rows


def _rank_plan(transfers: Sequence, rank: int, base: int) -> _RankPlan:
    # stable sorts: between two ranks both sides list the rows in plan order
    incoming = sorted((t for t in transfers if t.dst_rank == rank), key=lambda t: t.src_rank)
    outgoing = sorted((t for t in transfers if t.src_rank == rank and t.dst_rank != rank),
                      key=lambda t: t.dst_rank)
    return _RankPlan(
        dst_local=[t.dst_slot - base for t in incoming],
        recv=_runs([t.src_rank for t in incoming]),
        local_src=[t.src_slot - base for t in incoming if t.src_rank == rank],
        send=_runs([t.dst_rank for t in outgoing]),
        send_src=[t.src_slot - base for t in outgoing],
    )


def _view_send(layout: RowLayout, live: dict[str, torch.Tensor],
               slots: list[int]) -> torch.Tensor | None:
    """The live rows ``slots`` as one message without a gather, when that is possible: a single
    tensor name, no padding, contiguous memory and consecutive ascending slots."""
    if len(layout.names) != 1 or layout.stride != layout.sizes[0]:
        return None
    t = live[layout.names[0]]
    if not t.is_contiguous() or slots != list(range(slots[0], slots[0] + len(slots))):
        return None
    return byte_rows(t)[slots[0]:slots[-1] + 1].reshape(-1)


class PendingLayer:
    """One layer's posted transfers on one rank (``start_layer_transfer``).

    ``done()`` never blocks: True once this rank's receives (and sends) are complete; it raises
    the transfer's error if one failed. ``finish()`` returns the staged rows; after ``done()``
    it does not block (on CUDA it only orders the caller's stream after the side stream).
    """

    def __init__(self, staged: StagedLayer, works: list, stream: torch.cuda.Stream | None, keep: list,
                 start_event: torch.cuda.Event | None = None, posted_at: float | None = None) -> None:
        self._staged = staged
        self._works = works
        self._keep = keep  # pinned indices: alive until the transfer is done
        self._stream = stream
        self._start_event = start_event
        # from the start of posting: the gather and local copies are part of the transfer
        self._posted = time.perf_counter() if posted_at is None else posted_at
        self._done_at: float | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._event = None
        self._ready = threading.Event()
        cuda = stream is not None or staged.packed.is_cuda
        if stream is not None:  # CUDA: the side stream waits for NCCL; poll an event
            with torch.cuda.stream(stream):
                for work in works:
                    work.wait()  # a stream wait, not a host wait (NCCL)
                self._event = torch.cuda.Event(enable_timing=start_event is not None)
                self._event.record(stream)
        elif works and not cuda:  # gloo: completion is visible only through wait()
            threading.Thread(target=self._wait_gloo, name=f"eplb-recv-{staged.layer_idx}",
                             daemon=True).start()
        else:  # nothing to wait for, or CUDA without a side stream: order on the current stream
            for work in works:
                work.wait()
            self._done_at = time.perf_counter()
            self._ready.set()

    @property
    def layer_idx(self) -> int:
        return self._staged.layer_idx

    def _wait_gloo(self) -> None:
        try:
            for work in self._works:
                work.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by done()
            self._error = exc
        self._done_at = time.perf_counter()
        self._ready.set()

    def done(self) -> bool:
        if self._event is not None:
            return bool(self._event.query())
        if self._ready.is_set() and self._error is not None:
            raise self._error
        return self._ready.is_set()

    def seconds(self) -> float:
        """Time from posting to completion (CUDA: measured on the side stream); call after done."""
        if self._event is not None and self._start_event is not None:
            return self._start_event.elapsed_time(self._event) / 1e3
        if self._done_at is None:
            self._done_at = time.perf_counter()
        return self._done_at - self._posted

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until done (sync rebalances); TimeoutError after ``timeout_s``."""
        if self._event is not None:
            self._event.synchronize()
            return
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"transfer of layer {self.layer_idx} not done after {timeout_s}s")
        if self._error is not None:
            raise self._error

    def finish(self) -> StagedLayer:
        """The staged rows, ordered after the transfer on the caller's current stream."""
        if not self._finished:
            self._finished = True
            if self._event is not None:  # commit_layer marks the rows used on that stream
                torch.cuda.current_stream(self._stream.device).wait_event(self._event)
        return self._staged


def start_layer_transfer(
    layer_idx: int,
    transfers: Sequence,
    rank: int,
    tensors: dict[str, torch.Tensor],
    slots_per_rank: int,
    group: dist.ProcessGroup | None,
    stream: "torch.cuda.Stream | None" = None,
    pool: StagingPool | None = None,
) -> PendingLayer:
    """Post this rank's part of one layer's transfers; return without waiting for them.

    ``transfers``: the planner's ``Transfer(src_rank, src_slot, dst_rank, dst_slot, expert)``
    list for the layer (global slots), identical on every rank. ``tensors``: the layer's
    ``expert_tensors()`` (leading dim = ``slots_per_rank``). ``stream``: CUDA side stream for
    the copies and the receives' completion (None on CPU); it first waits for the caller's
    stream, so it sees every earlier commit. Every rank must post the same layer at the same
    point of its sequence of collectives (the caller's schedule guarantees it). ``pool``: where
    the layer's buffer comes from (default: this process's pool for the device).

    No host sync: indices reach the GPU from pinned memory, in one copy, without blocking.
    """
    posted_at = time.perf_counter()
    layout = row_layout(tensors)
    device = tensors[layout.names[0]].device
    pool = pool if pool is not None else pool_for(device)
    p = _rank_plan(transfers, rank, rank * slots_per_rank)
    peers = sorted((set(p.recv) | set(p.send)) - {rank})
    views = {q: v for q in p.send
             if (v := _view_send(layout, tensors, p.send_src[slice(*p.send[q])])) is not None}
    gathered: dict[int, tuple[int, int]] = {}  # peer -> its rows in the outgoing block
    gather_src: list[int] = []
    for q in sorted(p.send):
        if q not in views:
            rows_q = p.send_src[slice(*p.send[q])]
            gathered[q] = (len(gather_src), len(gather_src) + len(rows_q))
            gather_src += rows_q
    n_in, n_out = len(p.dst_local), len(gather_src)
    keep: list = []

    ctx = nullcontext()
    start_event = None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        ctx = torch.cuda.stream(stream)
        start_event = torch.cuda.Event(enable_timing=True)
    with ctx:
        if start_event is not None:
            start_event.record(stream)
        buffer = pool.acquire((n_in + n_out) * layout.stride, device)
        rows = buffer[:(n_in + n_out) * layout.stride].view(n_in + n_out, layout.stride)
        staging, outgoing = rows[:n_in], rows[n_in:]
        dst_index, local_src, gather_index = _upload(
            [p.dst_local, p.local_src, gather_src], device, keep)
        if n_out:
            gather_into(outgoing, layout, tensors, gather_index)
        ops: list[dist.P2POp] = []
        received = 0
        # tag: the layer, so a gloo pair never matches one layer's message with another's
        for peer in peers:
            if peer in views:
                ops.append(dist.P2POp(dist.isend, views[peer], peer, group, layer_idx))
            elif peer in gathered:
                lo, hi = gathered[peer]
                ops.append(dist.P2POp(dist.isend, outgoing[lo:hi].reshape(-1), peer, group,
                                      layer_idx))
            if peer in p.recv:
                lo, hi = p.recv[peer]
                ops.append(dist.P2POp(dist.irecv, staging[lo:hi].reshape(-1), peer, group,
                                      layer_idx))
                received += (hi - lo) * layout.payload
        works = dist.batch_isend_irecv(ops) if ops else []
        if rank in p.recv:  # after the P2P ops: on CUDA they overlap the transfer
            lo, hi = p.recv[rank]
            gather_into(staging[lo:hi], layout, tensors, local_src)
    staged = StagedLayer(layer_idx, torch.tensor(p.dst_local, dtype=torch.long), staging,
                         layout, received, len(ops), dst_index, buffer, pool)
    return PendingLayer(staged, list(works), stream, keep, start_event, posted_at)


def _upload(lists: list[list[int]], device: torch.device, keep: list) -> list[torch.Tensor]:
    """Index lists as LongTensors on ``device``: on CUDA one non-blocking copy from pinned
    memory (kept alive in ``keep`` until the transfer is done), then views."""
    flat = torch.tensor([v for values in lists for v in values], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory()
        keep.append(flat)
        flat = flat.to(device, non_blocking=True)
    out, at = [], 0
    for values in lists:
        out.append(flat[at:at + len(values)])
        at += len(values)
    return out


def stage_layer(
    layer_idx: int,
    transfers: Sequence,
    rank: int,
    tensors: dict[str, torch.Tensor],
    slots_per_rank: int,
    group: dist.ProcessGroup | None,
    timeout_s: float | None = None,
) -> StagedLayer:
    """``start_layer_transfer`` and wait for it (sync rebalances, tests)."""
    pending = start_layer_transfer(layer_idx, transfers, rank, tensors, slots_per_rank, group)
    pending.wait(timeout_s)
    return pending.finish()


def commit_layer(tensors: dict[str, torch.Tensor], staged: StagedLayer) -> None:
    """Write the staged rows in place (call only once every rank has staged this layer), then
    give the layer's buffer back to its pool."""
    if staged.dst_local.numel():
        index = staged.dst_index
        if index is None or index.device != staged.packed.device:
            index = staged.dst_local.to(staged.packed.device)
        scatter_from(staged.packed, staged.layout, tensors, index)
        if staged.packed.is_cuda:  # made on the transfer stream, read here on the current one
            current = torch.cuda.current_stream(staged.packed.device)
            index.record_stream(current)
            if staged.buffer is not None:
                staged.buffer.record_stream(current)
    if staged.pool is not None and staged.buffer is not None:
        staged.pool.release(staged.buffer)
    staged.buffer = staged.pool = None  # a second commit must not hand it out twice
