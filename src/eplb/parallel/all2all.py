"""Expert-parallel dispatchers: the MoE layer's ``dispatcher`` when experts live on many ranks.

A dispatcher is called as ``dispatcher(hidden[T, H], slot_ids[T, k], weights[T, k], expert_fn,
layer) -> out[T, H]`` (see docs/interfaces.md). ``slot_ids`` are physical slots (replica already
chosen by the layer, which also counted the load of the real tokens: padding added here never
counts). ``expert_fn(x[N, H], local_slot[N]) -> [N, H]`` runs this rank's experts.

Every backend rebuilds the per-(token, k) expert outputs ``[T, k, H]`` exactly as one process would
have computed them and then combines them with the model's own weighted sum, so the answer does
not depend on where an expert lives.

- ``allgather_reducescatter``: all-gather token counts (once per forward when the caller
  announces forwards with ``begin_step()``), then the padded hidden states and slot ids of every
  rank; each rank computes the pairs whose slot it holds into a zero ``[T_all, k, H]``
  buffer; a reduce-scatter hands every rank its own rows (each entry has exactly one non-zero
  contributor, so the sum is exact).
  Under CUDA graphs (``begin_static_step(t)``: every rank runs exactly ``t`` rows, the padded
  decode size all ranks agreed on) it has a static path: no count gather, no ``nonzero``, no
  host sync, shapes fixed by ``t``, so its collectives can be captured in the graph.
- ``naive``: an ``all_to_all`` of only the pairs each rank needs, and back.
- ``alltoall``: an ``all_to_all`` of each token once to each rank holding at least one of its
  slots (its slot ids ride in the same rows), and of the per-pair outputs back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist

from eplb import kernels
from eplb.config import ALL2ALL_BACKENDS
from eplb.model.moe import combine  # the one weighted sum over k, shared with one process

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Dispatcher = Callable[..., torch.Tensor]

# torch 2.13 renamed the flat collectives; 2.11/2.12 only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_nonzero_static = getattr(torch, "nonzero_static", None)  # no host sync for the output size


class AllGatherReduceScatter:
    """The default EP dispatcher (see the module docstring)."""

    name = "allgather_reducescatter"

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, device: torch.device):
        self.group = group
        self.world_size = world_size
        self.device = device
        # Every MoE layer of one forward sees the same token count on a rank, so once the rank
        # loop calls begin_step() the counts are gathered by the first layer only.
        self._per_step = False
        self._t_max: int | None = None
        self._own: int | None = None
        self._static_t: int | None = None  # set by begin_static_step: rows on every rank
        self._num_real: torch.Tensor | None = None  # 0-dim: this rank's real rows (the rest pad)

    def begin_step(self) -> None:
        """A new forward starts (called on every rank, before every forward); it runs the
        dynamic path unless ``begin_static_step`` follows."""
        self._per_step = True
        self._t_max = self._own = None
        self.end_static_step()

    def begin_static_step(self, num_tokens: int, num_real: torch.Tensor | None = None) -> None:
        """The next forwards (until ``end_static_step`` or ``begin_step``) run the static path:
        EVERY rank calls with exactly ``num_tokens`` rows (the padded decode size the ranks
        agreed on). ``num_real``: a 0-dim device tensor holding how many leading rows are real
        (a fixed buffer the caller rewrites before each replay); the padding rows after them get
        slot -1, so no rank computes them. None: every row is computed."""
        if num_tokens < 1:
            raise ValueError(f"a static step needs >= 1 row per rank, got {num_tokens}")
        self._static_t = int(num_tokens)
        self._num_real = num_real

    def end_static_step(self) -> None:
        self._static_t = None
        self._num_real = None

    def _token_max(self, num_tokens: int) -> int:
        if self._t_max is not None:
            if num_tokens != self._own:
                raise RuntimeError(f"token count changed within a step ({self._own} -> "
                                   f"{num_tokens}); call begin_step() before every forward")
            return self._t_max
        counts = torch.empty(self.world_size, dtype=torch.long, device=self.device)
        _all_gather_flat(counts, torch.tensor([num_tokens], device=self.device), group=self.group)
        t_max = max(int(counts.max()), 1)  # >= 1: zero-size collectives are not portable
        if self._per_step:
            self._t_max, self._own = t_max, num_tokens
        return t_max

    def __call__(
        self,
        hidden: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: torch.Tensor,
        expert_fn: ExpertFn,
        layer: object,
    ) -> torch.Tensor:
        if self._static_t is not None:
            return self._static(hidden, slot_ids, weights, expert_fn, layer)
        num_tokens, top_k = slot_ids.shape
        dim = hidden.shape[-1]
        t_max = self._token_max(num_tokens)

        pad_hidden = hidden.new_zeros(t_max, dim)
        pad_hidden[:num_tokens] = hidden
        pad_slots = torch.full((t_max, top_k), -1, dtype=torch.long, device=hidden.device)
        pad_slots[:num_tokens] = slot_ids
        own = self._exchange(pad_hidden, pad_slots, expert_fn, layer)
        return combine(own[:num_tokens], weights)

    def _exchange(self, hidden: torch.Tensor, slot_ids: torch.Tensor, expert_fn: ExpertFn,
                  layer: object) -> torch.Tensor:
        """Every rank's ``t`` rows (hidden [t, H], slot ids [t, k], the same t everywhere) ->
        this rank's per-pair outputs [t, k, H]: gather all rows, compute the pairs this rank
        holds, reduce-scatter the outputs back to their rows' ranks."""
        t, top_k = slot_ids.shape
        g, dim = self.world_size, hidden.shape[-1]
        all_hidden = hidden.new_empty(g * t, dim)
        all_slots = torch.empty(g * t, top_k, dtype=slot_ids.dtype, device=hidden.device)
        _all_gather_flat(all_hidden, hidden.contiguous(), group=self.group)
        _all_gather_flat(all_slots, slot_ids.contiguous(), group=self.group)
        pair_out = local_pair_outputs(all_hidden, all_slots, expert_fn, layer)
        own = hidden.new_empty(t, top_k, dim)
        _reduce_scatter_flat(own, pair_out, group=self.group)
        return own

    def _static(
        self,
        hidden: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: torch.Tensor,
        expert_fn: ExpertFn,
        layer: object,
    ) -> torch.Tensor:
        """The capturable path: every rank has exactly ``t`` rows, so there is nothing to pad
        and no count to gather; every (row, k) pair of the gathered batch is handed to the
        local expert compute with local slot -1 where another rank holds it (a fixed-shape
        mask instead of ``nonzero`` on the fused path). Padding rows (``num_real`` and beyond)
        travel with slot -1, as the dynamic path's padding does, so every slot computes the same
        pairs in the same order as there, and ``combine`` is the same: the same answer."""
        t = self._static_t
        num_tokens = slot_ids.shape[0]
        if num_tokens != t:
            raise RuntimeError(f"static step of {t} rows got {num_tokens}; every rank must run "
                               "the agreed padded size")
        if self._num_real is not None:
            real = torch.arange(t, device=slot_ids.device) < self._num_real
            slot_ids = torch.where(real.unsqueeze(1), slot_ids, -1)
        return combine(self._exchange(hidden, slot_ids, expert_fn, layer), weights)


def local_pair_outputs(x: torch.Tensor, slot_ids: torch.Tensor, expert_fn: ExpertFn,
                       layer: object) -> torch.Tensor:
    """x [N, H], global slot ids [N, k] -> [N, k, H]: expert(x[n]) for every pair whose slot
    this rank holds, zero for the others (-1, the padding slot, is never held).

    CUDA bf16/FP8 (``layer.use_fused``): the Triton ``fused_moe_pairs``, which skips local slot -1
    at no cost: fixed shapes and no host sync, so it can be captured. Elsewhere (CPU, or the torch
    expert path on CUDA) only the held pairs run through ``expert_fn``, gathered with
    ``nonzero`` (a host sync: never captured, which is why graphs under EP need the Triton path).
    Either way a slot's rows are the same pairs in the same order whatever the padding, so the
    per-pair outputs match the dynamic path's bit for bit where the expert compute is
    batch-invariant per slot (the torch path is: the gloo tests check it)."""
    start, end = int(layer.slot_start), int(layer.slot_end)
    mine = (slot_ids >= start) & (slot_ids < end)
    if expert_fn == getattr(layer, "expert_fn", None) and layer.use_fused(x):
        local = torch.where(mine, slot_ids - start, -1)
        return kernels.fused_moe_pairs(x, local, None, layer.w13, layer.w2,
                                       w13_scale=layer.w13_scale, w2_scale=layer.w2_scale)
    n, top_k = slot_ids.shape
    tok, kk = mine.nonzero(as_tuple=True)
    out = x.new_zeros(n, top_k, x.shape[-1])
    if tok.numel():
        out[tok, kk] = expert_fn(x[tok], slot_ids[tok, kk] - start)
    return out


class NaiveAllToAll:
    """Send each (token, k) pair only to the rank that holds its slot, and the result back."""

    name = "naive"

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, device: torch.device):
        self.group = group
        self.world_size = world_size
        self.device = device

    def begin_step(self) -> None:
        """Nothing to reset: the pair counts differ per layer."""

    def __call__(
        self,
        hidden: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: torch.Tensor,
        expert_fn: ExpertFn,
        layer: object,
    ) -> torch.Tensor:
        g = self.world_size
        num_tokens, top_k = slot_ids.shape
        dim = hidden.shape[-1]
        per_rank = (int(layer.slot_end) - int(layer.slot_start))
        flat_slots = slot_ids.reshape(-1)
        dest = torch.div(flat_slots, per_rank, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=g).to(torch.long)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()

        send_x = hidden[torch.div(order, top_k, rounding_mode="floor")]
        send_slot = flat_slots[order]
        recv_x = hidden.new_empty(sum(recv_split), dim)
        recv_slot = torch.empty(sum(recv_split), dtype=torch.long, device=hidden.device)
        dist.all_to_all_single(recv_x, send_x, recv_split, send_split, group=self.group)
        dist.all_to_all_single(recv_slot, send_slot, recv_split, send_split, group=self.group)

        if recv_x.shape[0]:
            result = expert_fn(recv_x, recv_slot - int(layer.slot_start))
        else:
            result = recv_x
        back = hidden.new_empty(num_tokens * top_k, dim)
        dist.all_to_all_single(back, result.contiguous(), send_split, recv_split, group=self.group)
        pair_out = hidden.new_empty(num_tokens * top_k, dim)
        pair_out[order] = back
        return combine(pair_out.view(num_tokens, top_k, dim), weights)


class SendPlan(NamedTuple):
    """Which token rows a rank sends where (``alltoall``), grouped by destination rank and in
    token order within a group: row ``i`` carries token ``token[i]`` to rank ``dest[i]``."""

    token: torch.Tensor  # [R] long
    dest: torch.Tensor  # [R] long


def routed_ranks(dest: torch.Tensor, world_size: int) -> torch.Tensor:
    """dest [T, k] (the rank of each pair's slot) -> hit [T, G] bool: token t goes to rank g."""
    hit = torch.zeros(dest.shape[0], world_size, dtype=torch.bool, device=dest.device)
    return hit.scatter_(1, dest, True)


def _true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries of a 1-D mask, ascending. The count is already on
    the host (exchanged for the splits), so no extra device-to-host sync is needed here."""
    if _nonzero_static is not None:
        return _nonzero_static(mask, size=count).view(-1)
    return torch.argsort((~mask).to(torch.int8), stable=True)[:count]


def plan_sends(hit: torch.Tensor, num_rows: int) -> SendPlan:
    """hit [T, G] (see :func:`routed_ranks`), num_rows = hit.sum() -> the rows to send: every
    (token, rank) pair of ``hit`` exactly once, rank-major then token order."""
    num_tokens = hit.shape[0]
    pos = _true_positions(hit.t().reshape(-1), num_rows)  # index g * T + t
    return SendPlan(pos % max(num_tokens, 1), torch.div(pos, max(num_tokens, 1),
                                                        rounding_mode="floor"))


def _slot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type the slot ids travel as beside hidden states of ``dtype``: a multiple of
    its size, so the hidden part of a received row can be viewed as ``dtype`` in place."""
    return torch.int32 if dtype.itemsize <= 4 else torch.int64


class TokenAllToAll:
    """Send each token once to each rank that holds one of its slots; get per-pair outputs back.

    Forward: one ``all_to_all_single`` of ``R`` byte rows, the hidden state followed by the
    token's k slot ids (int32, -1 where the slot is on another rank), where ``R`` is the
    number of distinct (token, destination rank) pairs. Back: one ``all_to_all_single`` of the
    ``T * k`` per-pair outputs, which the sender puts back in (token, k) order and combines as
    one process would. The row and pair counts per rank travel first, in one small collective,
    and reach the host once (the splits need them).
    """

    name = "alltoall"

    def __init__(self, group: dist.ProcessGroup | None, world_size: int, device: torch.device):
        self.group = group
        self.world_size = world_size
        self.device = device
        self.last_rows_sent = 0  # token rows this rank sent in the last call (self included)
        self.last_pairs_sent = 0  # (token, k) pairs those rows carried (= T * k)

    def begin_step(self) -> None:
        """Nothing to reset: the counts differ per layer."""

    def _exchange_counts(
        self, rows: torch.Tensor, pairs: torch.Tensor
    ) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per-destination row and pair counts [G] -> (send rows, send pairs, recv rows, recv
        pairs) per rank, as host lists: one all_to_all and one device-to-host copy."""
        send = torch.stack([rows, pairs], dim=1).to(torch.long)  # [G, 2]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        s_rows, s_pairs, r_rows, r_pairs = torch.cat([send.t(), recv.t()]).tolist()
        return s_rows, s_pairs, r_rows, r_pairs

    def _pack(self, hidden: torch.Tensor, slot_ids: torch.Tensor, dest: torch.Tensor,
              plan: SendPlan) -> torch.Tensor:
        """-> [R, H*b + k*s] uint8 send rows: the hidden state's bytes, then the k slot ids'
        (-1 for a slot that lives on another rank than the row's destination). Bytes, so no
        float rule can touch the slot ids on their way."""
        slots = torch.where(dest[plan.token] == plan.dest.unsqueeze(1), slot_ids[plan.token], -1)
        slot_bytes = slots.to(_slot_dtype(hidden.dtype)).view(torch.uint8)
        hidden_bytes = hidden[plan.token].view(torch.uint8)
        return torch.cat([hidden_bytes, slot_bytes], dim=1)

    def _compute(self, recv: torch.Tensor, dtype: torch.dtype, dim: int, top_k: int,
                 num_pairs: int, expert_fn: ExpertFn, slot_start: int) -> torch.Tensor:
        """recv [R_in, H*b + k*s] uint8 -> [num_pairs, H]: the outputs of every held (row, k)
        pair, in row then k order (the order the sender expects them back)."""
        split = dim * dtype.itemsize
        if num_pairs == 0:
            return torch.empty(0, dim, dtype=dtype, device=recv.device)
        slots = recv[:, split:].contiguous().view(_slot_dtype(dtype)).reshape(-1)  # [R_in * k]
        pos = _true_positions(slots >= 0, num_pairs)
        x = recv[:, :split].view(dtype)[torch.div(pos, top_k, rounding_mode="floor")]
        return expert_fn(x, slots[pos].to(torch.long) - slot_start)

    def __call__(
        self,
        hidden: torch.Tensor,
        slot_ids: torch.Tensor,
        weights: torch.Tensor,
        expert_fn: ExpertFn,
        layer: object,
    ) -> torch.Tensor:
        num_tokens, top_k = slot_ids.shape
        dim = hidden.shape[-1]
        per_rank = int(layer.slot_end) - int(layer.slot_start)
        dest = torch.div(slot_ids, per_rank, rounding_mode="floor")  # [T, k] rank of each pair
        hit = routed_ranks(dest, self.world_size)
        pair_counts = torch.bincount(dest.reshape(-1), minlength=self.world_size)
        s_rows, s_pairs, r_rows, r_pairs = self._exchange_counts(hit.sum(0), pair_counts)

        plan = plan_sends(hit, sum(s_rows))
        send = self._pack(hidden, slot_ids, dest, plan)
        recv = send.new_empty(sum(r_rows), send.shape[1])
        dist.all_to_all_single(recv, send, r_rows, s_rows, group=self.group)
        result = self._compute(recv, hidden.dtype, dim, top_k, sum(r_pairs), expert_fn,
                               int(layer.slot_start))

        back = hidden.new_empty(num_tokens * top_k, dim)
        dist.all_to_all_single(back, result.contiguous(), s_pairs, r_pairs, group=self.group)
        # back is grouped by rank, then token, then k: a stable sort of the pairs by rank
        order = torch.argsort(dest.reshape(-1), stable=True)
        pair_out = torch.empty_like(back)
        pair_out[order] = back
        self.last_rows_sent, self.last_pairs_sent = sum(s_rows), sum(s_pairs)
        return combine(pair_out.view(num_tokens, top_k, dim), weights)


_BACKENDS = {"allgather_reducescatter": AllGatherReduceScatter, "naive": NaiveAllToAll,
             "alltoall": TokenAllToAll}
assert tuple(_BACKENDS) == ALL2ALL_BACKENDS


def make_dispatcher(
    backend: str,
    group: dist.ProcessGroup | None,
    world_size: int,
    device: torch.device | str = "cpu",
) -> Dispatcher:
    """The dispatcher named ``backend``; ValueError listing the choices for an unknown name."""
    if backend not in _BACKENDS:
        raise ValueError(
            f"all2all_backend must be one of {', '.join(ALL2ALL_BACKENDS)}, got {backend!r}"
        )
    return _BACKENDS[backend](group, world_size, torch.device(device))
