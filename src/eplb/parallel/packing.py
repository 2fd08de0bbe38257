"""Byte layout of the EPLB transfer buffer: every tensor name's row of one expert packed into one
row of bytes, so one message per peer carries a layer's rows of every name.

A packed row is ``[name_0 row | pad | name_1 row | pad | ...]`` (names sorted; each name's
row starts at a multiple of ``ALIGN`` bytes, and the packed row's length is one too). Rows are
copied as integers as wide as the layout allows (int64 for real models), not as bytes: an
index kernel moves one element per thread and step, so 8-byte words take an eighth of the
steps of a byte-wise copy. Copies never look at the dtype, so float8 (and any other dtype)
moves bit for bit on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# start of each name's row inside a packed row: 16 keeps every name's columns viewable as int64
ALIGN = 16
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class RowLayout:
    """Where each tensor name's row of one expert lies inside a packed row (bytes)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]  # bytes of one row of each name, unpadded
    stride: int  # bytes of one packed row, padding included

    @property
    def payload(self) -> int:
        """Bytes of one expert as stored (padding excluded)."""
        return sum(self.sizes)


def row_layout(tensors: dict[str, torch.Tensor]) -> RowLayout:
    """The packed-row layout of a layer's ``expert_tensors()`` (same on every rank)."""
    names = tuple(sorted(tensors))
    offsets, sizes, end = [], [], 0
    for n in names:
        t = tensors[n]
        size = math.prod(t.shape[1:]) * t.element_size()
        offsets.append(_round_up(end, ALIGN))
        sizes.append(size)
        end = offsets[-1] + size
    return RowLayout(names, tuple(offsets), tuple(sizes), _round_up(end, ALIGN))


def byte_rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` -> ``[n, row_bytes]`` uint8. A view of ``t`` when it is contiguous (the
    expert tensors are), else a copy (fine for reading, never written through)."""
    return t.reshape(t.shape[0], -1).view(torch.uint8)


def _word(*nbytes: int) -> int:
    """The widest word size that divides every byte count (sizes, offsets, strides)."""
    for w in (8, 4, 2, 1):
        if all(n % w == 0 for n in nbytes):
            return w
    return 1


def _as_words(rows: torch.Tensor, w: int) -> torch.Tensor:
    """uint8 ``[n, k]`` (last dim contiguous) -> the same memory as ``[n, k / w]`` words."""
    return rows.view(_WORDS[w])


def _aligned_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two uint8 row views of equal width, as the widest word both allow."""
    nbytes = [a.shape[1]]
    for t in (a, b):
        nbytes += [t.storage_offset(), t.stride(0)]
    w = _word(*nbytes)
    return _as_words(a, w), _as_words(b, w)


def columns(packed: torch.Tensor, layout: RowLayout, name: str) -> torch.Tensor:
    """uint8 ``[n, row_bytes]`` view of ``name``'s columns in packed rows ``[n, stride]``."""
    i = layout.names.index(name)
    return packed[:, layout.offsets[i]:layout.offsets[i] + layout.sizes[i]]


def gather_into(packed: torch.Tensor, layout: RowLayout, live: dict[str, torch.Tensor],
                index: torch.Tensor) -> None:
    """``packed[j] = row index[j] of every name``: one index_select per name, written straight
    into the packed rows (no temporary)."""
    for n in layout.names:
        out, src = _aligned_pair(columns(packed, layout, n), byte_rows(live[n]))
        torch.index_select(src, 0, index, out=out)


def scatter_from(packed: torch.Tensor, layout: RowLayout, live: dict[str, torch.Tensor],
                 index: torch.Tensor) -> None:
    """Row ``index[j]`` of every name ``= packed[j]``: one index_copy_ per name."""
    for n in layout.names:
        t = live[n]
        src = columns(packed, layout, n)
        if t.is_contiguous():
            src, dst = _aligned_pair(src, byte_rows(t))
            dst.index_copy_(0, index, src)
        else:  # no byte view of t's memory: write through its own dtype (index_put)
            t[index] = src.contiguous().view(t.dtype).view((src.shape[0],) + t.shape[1:])


class StagingPool:
    """Grow-only byte buffers reused across layers (one pool per device).

    A layer holds its buffer from posting until ``commit_layer`` returns it, so a buffer is
    never handed out while a posted layer can still receive into it or send from it, however
    many layers are in flight. A layer that is never committed (abandoned) simply keeps its
    buffer until it is garbage. All calls come from the rank's main thread.

    Reuse matters most on CPU, where a fresh buffer of hundreds of MB is new pages the kernel
    must fault in; on CUDA the caching allocator already recycles memory, and the pool saves
    little more than the allocator calls. CUDA ordering: a buffer comes back only after the
    commit's copies were enqueued on the caller's stream, and the next layer's transfer stream
    waits for that stream before it touches the buffer again.
    """

    def __init__(self, max_free: int = 8) -> None:
        self._free: list[torch.Tensor] = []
        self._max_free = max_free
        self.allocations = 0  # buffers made (tests and benchmarks read it)

    def acquire(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (the smallest free one that fits, else a new
        one; a too-small free buffer is dropped, so the pool grows rather than multiplies)."""
        # by position, never list.remove: that compares tensors with ==, elementwise
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
        if fits:
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        if self._free:
            self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))
        self.allocations += 1
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)

    def release(self, buf: torch.Tensor) -> None:
        if len(self._free) < self._max_free and all(b is not buf for b in self._free):
            self._free.append(buf)


_POOLS: dict[torch.device, StagingPool] = {}


def pool_for(device: torch.device) -> StagingPool:
    """This process's pool for ``device``."""
    return _POOLS.setdefault(torch.device(device), StagingPool())
