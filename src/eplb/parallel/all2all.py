"""Expert-parallel dispatchers: the MoE layer's ``dispatcher`` when experts live on many ranks.

A dispatcher is called as ``dispatcher(hidden[T, H], slot_ids[T, k], weights[T, k], expert_fn,
layer) -> out[T, H]`` (see docs/interfaces.md). ``slot_ids`` are physical slots (replica already
chosen by the layer, which also counted the load of the real tokens: padding added here never
counts). ``expert_fn(x[N, H], local_slot[N]) -> [N, H]`` runs this rank's experts.

Both backends rebuild the per-(token, k) expert outputs ``[T, k, H]`` exactly as one process would
have computed them and then combine them with the model's own weighted sum, so the answer does
not depend on where an expert lives.

- ``allgather_reducescatter``: all-gather token counts (once per forward when the caller
  announces forwards with ``begin_step()``), then the padded hidden states and slot ids of every
  rank; each rank computes the pairs whose slot it holds into a zero ``[T_all, k, H]``
  buffer; a reduce-scatter hands every rank its own rows (each entry has exactly one non-zero
  contributor, so the sum is exact).
- ``naive``: an ``all_to_all`` of only the pairs each rank needs, and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.config import ALL2ALL_BACKENDS
from eplb.model.moe import combine  # the one weighted sum over k, shared with one process

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Dispatcher = Callable[..., torch.Tensor]

# torch 2.13 renamed the flat collectives; 2.11/2.12 only have the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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

    def begin_step(self) -> None:
        """A new forward starts (called on every rank, before every forward)."""
        self._per_step = True
        self._t_max = self._own = None

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
        g = self.world_size
        num_tokens, top_k = slot_ids.shape
        dim = hidden.shape[-1]
        t_max = self._token_max(num_tokens)

        pad_hidden = hidden.new_zeros(t_max, dim)
        pad_hidden[:num_tokens] = hidden
        pad_slots = torch.full((t_max, top_k), -1, dtype=torch.long, device=hidden.device)
        pad_slots[:num_tokens] = slot_ids
        all_hidden = hidden.new_empty(g * t_max, dim)
        all_slots = torch.empty(g * t_max, top_k, dtype=torch.long, device=hidden.device)
        _all_gather_flat(all_hidden, pad_hidden, group=self.group)
        _all_gather_flat(all_slots, pad_slots, group=self.group)

        start, end = int(layer.slot_start), int(layer.slot_end)
        mine = (all_slots >= start) & (all_slots < end)  # padding (-1) is never mine
        tok, kk = mine.nonzero(as_tuple=True)
        pair_out = hidden.new_zeros(g * t_max, top_k, dim)
        if tok.numel():
            pair_out[tok, kk] = expert_fn(all_hidden[tok], all_slots[tok, kk] - start)
        own = hidden.new_empty(t_max, top_k, dim)
        _reduce_scatter_flat(own, pair_out, group=self.group)
        return combine(own[:num_tokens], weights)


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


_BACKENDS = {"allgather_reducescatter": AllGatherReduceScatter, "naive": NaiveAllToAll}
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
