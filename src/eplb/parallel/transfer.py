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

Rows travel as raw bytes, so any dtype (float8 included) works on gloo and NCCL alike; between
each pair of ranks, one message per tensor name carries all rows of that layer, in plan order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
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
    messages: int = 0  # point-to-point ops (sends + receives) this rank posted for the layer


def row_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of one expert as stored: one row of every per-slot tensor."""
    return sum(t[0].numel() * t.element_size() for t in tensors.values())


def plan_bytes(transfers: Sequence, tensors: dict[str, torch.Tensor]) -> int:
    """Bytes moved by one layer's transfers (every copy counted once, local copies included)."""
    return len(transfers) * row_bytes(tensors)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _byte_rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` contiguous -> the same memory as ``[n, row_bytes]`` uint8 (a view)."""
    return t.reshape(t.shape[0], -1).view(torch.uint8)


class PendingLayer:
    """One layer's posted transfers on one rank (``start_layer_transfer``).

    ``done()`` never blocks: True once this rank's receives (and sends) are complete; it raises
    the transfer's error if one failed. ``finish()`` returns the staged rows; after ``done()``
    it does not block (on CUDA it only orders the caller's stream after the side stream).
    """

    def __init__(self, staged: StagedLayer, works: list, stream, keep: list,
                 start_event=None) -> None:
        self._staged = staged
        self._works = works
        self._keep = keep  # send payloads and pinned indices: alive until the transfer is done
        self._stream = stream
        self._start_event = start_event
        self._posted = time.perf_counter()
        self._done_at: float | None = None
        self._error: BaseException | None = None
        self._finished = False
        self._event = None
        self._ready = threading.Event()
        cuda = stream is not None or any(r.is_cuda for r in staged.rows.values())
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
) -> PendingLayer:
    """Post this rank's part of one layer's transfers; return without waiting for them.

    ``transfers``: the planner's ``Transfer(src_rank, src_slot, dst_rank, dst_slot, expert)``
    list for the layer (global slots), identical on every rank. ``tensors``: the layer's
    ``expert_tensors()`` (leading dim = ``slots_per_rank``). ``stream``: CUDA side stream for
    the copies and the receives' completion (None on CPU); it first waits for the caller's
    stream, so it sees every earlier commit. Every rank must post the same layer at the same
    point of its sequence of collectives (the caller's schedule guarantees it).

    No host sync: indices reach the GPU from pinned memory without blocking, and each peer's
    rows are received straight into one contiguous block of the staging buffers.
    """
    base = rank * slots_per_rank
    names = sorted(tensors)
    device = tensors[names[0]].device
    # incoming rows grouped by source rank: each peer's rows are one contiguous staging block
    incoming = sorted((t for t in transfers if t.dst_rank == rank), key=lambda t: t.src_rank)
    dst_local = torch.tensor([t.dst_slot - base for t in incoming], dtype=torch.long)
    keep: list = []

    def index(values: list[int]) -> torch.Tensor:
        idx = torch.tensor(values, dtype=torch.long)
        if device.type != "cuda":
            return idx
        idx = idx.pin_memory()
        keep.append(idx)
        return idx.to(device, non_blocking=True)

    ctx = nullcontext()
    start_event = None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        ctx = torch.cuda.stream(stream)
        start_event = torch.cuda.Event(enable_timing=True)
    with ctx:
        if start_event is not None:
            start_event.record(stream)
        # staging[name] : [n_in, *row_shape], filled by local copies now and receives later
        staging = {
            n: torch.empty((len(incoming),) + tuple(tensors[n].shape[1:]),
                           dtype=tensors[n].dtype, device=device)
            for n in names
        }
        local = [(i, t.src_slot - base) for i, t in enumerate(incoming) if t.src_rank == rank]
        if local:
            dst_i, src_i = index([i for i, _ in local]), index([s for _, s in local])
            for n in names:  # on byte rows: index_copy_ has no float8 kernel on CPU
                _byte_rows(staging[n]).index_copy_(0, dst_i, _byte_rows(
                    tensors[n]).index_select(0, src_i))
        ops: list[dist.P2POp] = []
        received = 0
        for peer in sorted({t.src_rank for t in transfers} | {t.dst_rank for t in transfers}):
            if peer == rank:
                continue
            out_rows = [t.src_slot - base for t in transfers
                        if t.src_rank == rank and t.dst_rank == peer]
            in_rows = [i for i, t in enumerate(incoming) if t.src_rank == peer]
            src_i = index(out_rows) if out_rows else None
            for tag, n in enumerate(names):
                if src_i is not None:
                    payload = _as_bytes(tensors[n].index_select(0, src_i))
                    keep.append(payload)
                    ops.append(dist.P2POp(dist.isend, payload, peer, group, tag))
                if in_rows:
                    block = staging[n][in_rows[0]:in_rows[-1] + 1]  # contiguous: a view
                    ops.append(dist.P2POp(dist.irecv, _as_bytes(block), peer, group, tag))
                    received += block.numel() * block.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
    staged = StagedLayer(layer_idx, dst_local, staging, received, len(ops))
    return PendingLayer(staged, list(works), stream, keep, start_event)


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
    """Write the staged rows in place (call only once every rank has staged this layer)."""
    if not staged.dst_local.numel():
        return
    dst = staged.dst_local.to(next(iter(staged.rows.values())).device)  # one copy, every name
    for n, rows in staged.rows.items():
        tensors[n][dst] = rows
        if rows.is_cuda:  # staged on the transfer stream, read here on the current one
            rows.record_stream(torch.cuda.current_stream(rows.device))
