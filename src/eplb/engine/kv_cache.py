"""Slotted KV cache: per layer ``k, v [num_slots, kv_heads, max_len, head_dim]``.

A sequence holds one slot from admission to finish, so decode attention is one batched
SDPA over a contiguous range of slots. The lowest free slot is handed out first, which keeps
running sequences packed at the front. One extra row, ``scratch_slot``, is never handed out:
padding rows of a CUDA-graph decode batch write their (ignored) keys and values there.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(
        self, *, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str,
    ):
        shape = (num_slots + 1, num_kv_heads, max_len, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @staticmethod
    def bytes_per_slot(*, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * max_len * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
