"""The MoE layer: router -> top-k logical experts -> replica choice -> physical slots ->
load counting -> dispatch (in-process by default) -> grouped expert compute -> combine.

Only the slots of this EP rank live here (``slot_start:slot_end``). The dispatcher is a
hook the runtime replaces with an EP all-to-all; every dispatcher combines per-(token, k)
outputs ``[T, k, H]`` with :func:`combine`, so results do not depend on where an expert lives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from eplb import kernels
from eplb.balancer.dispatch import static_slots, water_fill_slots
from eplb.balancer.placement import build_log2phy
from eplb.model.checkpoint import dequantize_block_fp8
from eplb.model.cpu_experts import padded_expert_forward

if TYPE_CHECKING:
    from eplb.kernels.moe_triton import PairSort

_grouped_mm = getattr(torch, "_grouped_mm", None)  # grouped GEMM (torch >= 2.8 has a CPU path)

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Dispatcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertFn, "MoELayer"], torch.Tensor]


def expert_forward(
    x: torch.Tensor, local_slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts grouped by slot: x [N, H], local_slot [N] in [0, S), w13 [S, 2I, H]
    (gate rows then up rows), w2 [S, H, I] -> [N, H].

    Rows are sorted by slot and each slot with rows gets one matmul pair. This is the one
    function a fused (e.g. Triton) grouped-GEMM kernel replaces.
    """
    n, h = x.shape
    out = x.new_empty(n, h)
    if n == 0:
        return out
    num_slots = w13.shape[0]
    inter = w2.shape[2]
    if n == 1:  # decode of one token: no sort needed
        s = int(local_slot[0])
        gu = F.linear(x, w13[s])
        out = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[s])
        return out
    if x.device.type == "cpu" and n <= 1024:
        y = padded_expert_forward(x, local_slot, w13, w2)  # None: mostly padding at this size
        if y is not None:
            return y
    order = torch.argsort(local_slot, stable=True)
    if x.device.type == "cpu" and _grouped_mm is not None and n <= 1024:
        # one C++ grouped GEMM per projection (decode-sized batches: saves the per-slot Python
        # overhead; for large prefills the per-slot loop measured as fast or faster)
        offs = torch.cumsum(torch.bincount(local_slot, minlength=num_slots), 0).to(torch.int32)
        xs = x.index_select(0, order)
        gu = _grouped_mm(xs, w13.transpose(1, 2), offs=offs)
        y = _grouped_mm(F.silu(gu[:, :inter]) * gu[:, inter:], w2.transpose(1, 2), offs=offs)
        out.index_copy_(0, order, y)
        return out
    counts = torch.bincount(local_slot, minlength=num_slots).tolist()
    chunks = torch.split(x.index_select(0, order), counts)
    ys = []
    for s, c in enumerate(counts):
        if c:
            gu = F.linear(chunks[s], w13[s])
            ys.append(F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[s]))
    out.index_copy_(0, order, torch.cat(ys) if len(ys) > 1 else ys[0])
    return out


def combine(expert_out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """expert_out [T, k, H], weights [T, k] -> [T, H], summed over k in a fixed order."""
    out = expert_out[:, 0] * weights[:, 0:1]
    for j in range(1, expert_out.shape[1]):
        out = out + expert_out[:, j] * weights[:, j : j + 1]
    return out


def local_dispatch(
    hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, expert_fn: ExpertFn,
    layer: "MoELayer", hidden_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    pair_sort: PairSort | None = None,
) -> torch.Tensor:
    """In-process dispatcher: every slot is local. hidden [T, H], slot_ids/weights [T, k];
    ``hidden_fp8``: hidden already quantized for block-FP8 experts; ``pair_sort``: the pairs
    already sorted by slot by the router launch (both used by the Triton path)."""
    t, k = slot_ids.shape
    flat = slot_ids.reshape(-1)
    partial = layer.slot_start != 0 or layer.slot_end != layer.num_physical
    if partial and t and bool(((flat < layer.slot_start) | (flat >= layer.slot_end)).any()):
        raise RuntimeError("local_dispatch got a slot this rank does not hold; install an EP "
                           "dispatcher")
    if expert_fn == layer.expert_fn and layer.use_fused(hidden):
        # CUDA bf16: the Triton kernel sorts, computes and sums over k itself (eplb.kernels);
        # every slot is local here (checked above), so the sum can ride on the down projection
        local = slot_ids - layer.slot_start if layer.slot_start else slot_ids
        return kernels.fused_moe(hidden, local, weights, layer.w13, layer.w2, w13_scale=layer.w13_scale,
                                 w2_scale=layer.w2_scale, x_fp8=hidden_fp8, all_local=True, pair_sort=pair_sort)
    x = hidden.repeat_interleave(k, dim=0) if k > 1 else hidden
    y = expert_fn(x, flat - layer.slot_start).view(t, k, hidden.shape[1])
    return combine(y, weights)


REPLICA_DISPATCH = ("static", "load_aware")


def _maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [P] -> (log2phy [E, M] ascending, -1 padded; replica_count [E]) on the CPU
    (``eplb.balancer.placement.build_log2phy`` for one layer)."""
    row = phy2log.cpu().long().view(1, -1)
    count = torch.bincount(row[0], minlength=num_experts)
    if bool((count == 0).any()):
        missing = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"phy2log leaves logical experts {missing} without a slot")
    log2phy, counts = build_log2phy(row, num_experts)
    return log2phy[0], counts[0]


class MoELayer(nn.Module):
    """Sparse MoE block holding local slots ``[slot_start, slot_end)`` of ``num_physical``.

    Tensors: ``gate_weight [E, H]``, ``w13 [S, 2I, H]``, ``w2 [S, H, I]`` (S local slots).
    Buffers: ``phy2log [P]``, ``log2phy [E, M]``, ``replica_count [E]``, ``expert_load [E]``.
    """

    def __init__(
        self, *, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
        norm_topk_prob: bool, phy2log: torch.Tensor, ep_rank: int, ep_size: int,
        dtype: torch.dtype, device: torch.device | str, layer_idx: int, moe_idx: int,
        quantization: str | None = None,
    ):
        super().__init__()
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
        p = int(phy2log.numel())
        if p % ep_size:
            raise ValueError(f"num physical slots {p} is not divisible by ep_size {ep_size}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.num_physical = p
        per = p // ep_size
        self.slot_start = ep_rank * per
        self.slot_end = self.slot_start + per
        self.layer_idx = layer_idx  # decoder layer index
        self.moe_idx = moe_idx  # index in model.moe_layers()
        self._dispatcher: Dispatcher = local_dispatch
        self.gate_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        # "fp8": block-FP8 weights (float8_e4m3fn) + float32 weight_scale_inv per 128x128 block
        wdt = torch.float8_e4m3fn if quantization == "fp8" else dtype
        self.w13 = nn.Parameter(
            torch.empty(per, 2 * intermediate_size, hidden_size, dtype=wdt, device=device),
            requires_grad=False,
        )
        self.w2 = nn.Parameter(
            torch.empty(per, hidden_size, intermediate_size, dtype=wdt, device=device),
            requires_grad=False,
        )
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if quantization == "fp8":
            if hidden_size % 128 or intermediate_size % 128:
                raise ValueError(f"FP8 experts need hidden and intermediate sizes divisible by 128, "
                                 f"got {hidden_size}, {intermediate_size}")
            hb, ib = hidden_size // 128, intermediate_size // 128
            self.w13_scale = nn.Parameter(
                torch.empty(per, 2 * ib, hb, dtype=torch.float32, device=device), requires_grad=False)
            self.w2_scale = nn.Parameter(
                torch.empty(per, hb, ib, dtype=torch.float32, device=device), requires_grad=False)
        log2phy, count = _maps(phy2log, num_experts)
        self.register_buffer("phy2log", phy2log.clone().long().to(device))
        # log2phy lives in a buffer of the widest possible shape [E, P - E + 1] (-1 padded) that
        # set_placement overwrites in place: a captured CUDA graph keeps reading the right maps
        # after an EPLB commit, with no re-capture
        buf = torch.full((num_experts, p - num_experts + 1), -1, dtype=torch.long)
        buf[:, : log2phy.shape[1]] = log2phy
        self.register_buffer("log2phy_buf", buf.to(device))
        self._max_replicas = int(log2phy.shape[1])
        self.register_buffer("replica_count", count.to(device))
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long, device=device))
        self.register_buffer("_replica_offset", torch.zeros((), dtype=torch.long, device=device))
        self._all_single = bool((count == 1).all())
        # What the runtime may change, only through the methods under "runtime settings":
        # True while CUDA graphs are captured/replayed: no Python branch may depend on the placement
        self._static_maps = False
        self._fused_experts = True  # Triton kernels on CUDA bf16/FP8 (see use_fused)
        # "static" (round robin over replicas) or "load_aware" (EPLBConfig.replica_dispatch)
        self._replica_dispatch = "static"
        # dummy weights only (eplb.model.dummy.RouterSkew): a bias [E] added to the router logits
        # and a hook run before routing (advances the skew's device step counter); None otherwise
        self.router_bias: torch.Tensor | None = None
        self.before_route: Callable[[], None] | None = None

    def set_router_skew(self, bias: torch.Tensor, before_route: Callable[[], None] | None = None) -> None:
        """Dummy weights only: add ``bias`` [E] to the router logits, and run ``before_route``
        before each routing (eplb.model.dummy.install_router_skew)."""
        self.router_bias = bias
        self.before_route = before_route

    # -- contract -----------------------------------------------------------------------------
    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor (leading dim = local slot count); with FP8 the scales too, so an
        EPLB move carries them with their weights."""
        t = {"w13": self.w13.data, "w2": self.w2.data}
        if self.w13_scale is not None:
            t["w13_scale"], t["w2_scale"] = self.w13_scale.data, self.w2_scale.data
        return t

    @property
    def log2phy(self) -> torch.Tensor:
        """[E, M] slots of each expert ascending, -1 padded (M = current max replica count)."""
        return self.log2phy_buf[:, : self._max_replicas]

    @property
    def replica_offset(self) -> int:
        return int(self._replica_offset)

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    # -- runtime settings: the only ways other modules change this layer -----------------------
    def install_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Route the (token, slot) pairs through ``dispatcher`` (an EP all-to-all, see
        ``eplb.parallel.all2all``) instead of the in-process one."""
        self._dispatcher = dispatcher

    def set_replica_offset(self, value: int) -> None:
        """Where this step's round robin over an expert's replicas starts (the runtime spreads
        it over ranks and steps); written in place, so captured graphs read it."""
        self._replica_offset.fill_(int(value))

    def set_replica_dispatch(self, mode: str) -> None:
        """"static" (round robin) or "load_aware" (water-filling over the replicas' ranks)."""
        if mode not in REPLICA_DISPATCH:
            raise ValueError(f"replica_dispatch must be one of {', '.join(REPLICA_DISPATCH)}, "
                             f"got {mode!r}")
        self._replica_dispatch = mode

    def set_static_maps(self, static: bool) -> None:
        """True while CUDA graphs are captured or replayed: no branch may depend on the maps."""
        self._static_maps = bool(static)

    def set_fused_experts(self, fused: bool) -> None:
        """False forces the torch expert path (a reference for the Triton kernels)."""
        self._fused_experts = bool(fused)

    def set_placement(
        self, phy2log: torch.Tensor, log2phy: torch.Tensor, replica_count: torch.Tensor
    ) -> None:
        if phy2log.numel() != self.num_physical:
            raise ValueError(f"phy2log has {phy2log.numel()} slots, layer has {self.num_physical}")
        m = log2phy.shape[1]
        if m > self.log2phy_buf.shape[1]:
            raise ValueError(f"log2phy has {m} replica columns, at most {self.log2phy_buf.shape[1]} fit")
        dev = self.phy2log.device
        self.phy2log.copy_(phy2log.to(dev))
        self.log2phy_buf[:, :m].copy_(log2phy.to(device=dev, dtype=torch.long))
        self.log2phy_buf[:, m:].fill_(-1)
        self._max_replicas = int(m)
        self.replica_count.copy_(replica_count.to(dev))
        self._all_single = bool((replica_count == 1).all())

    def take_load(self) -> torch.Tensor:
        load = self.expert_load.clone()
        self.expert_load.zero_()
        return load

    # -- compute ------------------------------------------------------------------------------
    def _before_route(self) -> None:
        if self.before_route is not None:
            self.before_route()

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        self._before_route()
        return F.linear(x, self.gate_weight, self.router_bias)

    @staticmethod
    def _fused_router(x: torch.Tensor) -> bool:
        """The router tail runs in the Triton kernel (``kernels.route_topk``)."""
        return x.is_cuda and x.shape[0] > 0 and kernels.HAS_TRITON

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x.dtype, logical ids [T, k])."""
        logits = self._router_logits(x)
        if self._fused_router(x):
            # softmax + top-k + renormalise + cast in one launch (eplb.kernels.routing)
            w, ids, _ = kernels.route_topk(logits, self.top_k, self.norm_topk_prob, weight_dtype=x.dtype)
            return w, ids
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), ids

    def choose_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Logical ids [T, k] -> physical slots [T, k].

        ``replica_dispatch == "static"``: the j-th pair (in (t, k) order) routed to expert e goes
        to replica (replica_offset + j) % replica_count[e]. ``"load_aware"``: each expert's pairs
        of this step are split over its replicas by water-filling over the replicas' ranks
        (``eplb.balancer.dispatch``). Either way a pair goes to a slot of its own expert.

        No host sync and no placement-dependent branch under ``static_maps`` (CUDA graphs)."""
        single = self.single_replica_map()
        if single is not None:
            return single[ids]
        flat = ids.reshape(-1)
        if self._replica_dispatch == "load_aware":
            # the full-width map under graphs: its shape never changes with the placement
            maps = self.log2phy_buf if self._static_maps else self.log2phy
            per_rank = self.slot_end - self.slot_start
            return water_fill_slots(flat, maps, self.replica_count, per_rank,
                                    self.num_physical // per_rank).view_as(ids)
        return static_slots(flat, self.log2phy_buf, self.replica_count, self._replica_offset).view_as(ids)

    def single_replica_map(self) -> torch.Tensor | None:
        """log2phy's column 0 [E] when every expert has exactly one replica (slot = map[id]),
        else None. Without redundant slots no placement can have replicas, so the map is safe in
        CUDA graphs; with them, only outside graphs (a commit may add replicas)."""
        if self.num_physical == self.num_experts or (self._all_single and not self._static_maps):
            return self.log2phy_buf[:, 0]
        return None

    def expert_fn(self, x: torch.Tensor, local_slot: torch.Tensor) -> torch.Tensor:
        if self.use_fused(x):
            return kernels.fused_experts(x, local_slot, self.w13, self.w2, w13_scale=self.w13_scale,
                                 w2_scale=self.w2_scale)
        if self.w13_scale is not None:
            # FP8 off the Triton path (fused_experts off, e.g. as a reference): dequantize per call
            w13 = dequantize_block_fp8(self.w13, self.w13_scale, [128, 128]).to(x.dtype)
            w2 = dequantize_block_fp8(self.w2, self.w2_scale, [128, 128]).to(x.dtype)
            return expert_forward(x, local_slot, w13, w2)
        return expert_forward(x, local_slot, self.w13, self.w2)

    def use_fused(self, x: torch.Tensor) -> bool:
        """True when the Triton kernels (eplb.kernels) run this layer: CUDA, bf16 activations,
        bf16 or block-FP8 weights, triton present and ``set_fused_experts`` (set it False for the
        torch path, e.g. as a reference)."""
        return (self._fused_experts and kernels.HAS_TRITON and x.is_cuda and x.dtype == torch.bfloat16
                and (self.w13.dtype == torch.bfloat16 or self.w13_scale is not None))

    @property
    def fp8_input(self) -> bool:
        """The experts are block-FP8 and run in-process: forward can take x pre-quantized."""
        return self.w13_scale is not None and self._dispatcher is local_dispatch

    def forward(self, x: torch.Tensor, num_real_tokens: int | torch.Tensor | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]. Only the first ``num_real_tokens`` rows count as load (padding
        and dummy-step rows do not); a 0-dim tensor there keeps the count on the device (graphs).
        ``x_fp8``: x quantized per row and 128 columns (see ``fp8_input``); the router still
        reads x."""
        sort = None
        if self._fused_router(x):
            weights, slots, sort = self._route_fused(x, num_real_tokens)
        else:
            weights, ids = self.route(x)
            self.count_load(ids, num_real_tokens)
            slots = self.choose_slots(ids)
        if (x_fp8 is not None and self.fp8_input) or sort is not None:
            return local_dispatch(x, slots, weights, self.expert_fn, self,
                                  hidden_fp8=x_fp8 if self.fp8_input else None, pair_sort=sort)
        return self._dispatcher(x, slots, weights, self.expert_fn, self)

    def _route_fused(self, x: torch.Tensor, num_real_tokens: int | torch.Tensor | None):
        """route + count_load + choose_slots with one Triton launch after the router matmul
        (``kernels.route_topk``; the replica choice stays in torch when experts have several
        replicas), or with the matmul in that launch up to ``kernels.ROUTER_MATMUL_MAX_TOKENS``
        tokens (``kernels.route_logits_topk``: its logits are summed in another order than
        cuBLAS's, so they may differ by a rounding). Otherwise the unfused path's values: weights
        rounded once from float32, exact integer counts. -> (weights, slots, the pairs sorted by
        slot for the experts or None)."""
        single = self.single_replica_map()
        sort = self._new_pair_sort(x) if single is not None else None
        tail = dict(weight_dtype=x.dtype, slot_map=single, load=self.expert_load, num_real=num_real_tokens,
                    pair_sort=sort)
        if x.shape[0] <= kernels.ROUTER_MATMUL_MAX_TOKENS and self.num_experts % 16 == 0:
            # decode sizes: the router matmul in the tail's launch (eplb.kernels.routing)
            self._before_route()
            weights, ids, slots = kernels.route_logits_topk(x, self.gate_weight, self.router_bias, self.top_k,
                                                            self.norm_topk_prob, **tail)
        else:
            weights, ids, slots = kernels.route_topk(self._router_logits(x), self.top_k, self.norm_topk_prob,
                                                     **tail)
        if slots is None:
            slots = self.choose_slots(ids)
        return weights, slots, sort

    def _new_pair_sort(self, x: torch.Tensor):
        """Buffers for the router launch to sort the pairs into (``kernels.new_pair_sort``), when
        the in-process Triton experts run this call and it is small enough
        (``kernels.SORT_IN_ROUTER_MAX_TOKENS``), else None."""
        t = x.shape[0]
        n_pairs = t * self.top_k
        if not (0 < t <= kernels.SORT_IN_ROUTER_MAX_TOKENS and self._dispatcher is local_dispatch
                and self.slot_start == 0 and self.slot_end == self.num_physical and self.use_fused(x)
                and kernels.small_sort_fits(n_pairs, self.num_physical)):
            return None
        return kernels.new_pair_sort(n_pairs, self.num_physical, self.w13_scale is not None, x.device)

    def count_load(self, ids: torch.Tensor, num_real_tokens: int | torch.Tensor | None) -> None:
        """expert_load[e] += pairs of the first ``num_real_tokens`` rows of ids [T, k] routed to e."""
        t = ids.shape[0]
        if isinstance(num_real_tokens, torch.Tensor):
            real = torch.arange(t, device=ids.device) < num_real_tokens
            src = real[:, None].expand_as(ids).reshape(-1).long()
            self.expert_load.scatter_add_(0, ids.reshape(-1), src)
            return
        n = t if num_real_tokens is None else num_real_tokens
        if n > 0:
            flat = ids[:n].reshape(-1)
            self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))
