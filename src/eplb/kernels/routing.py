"""Fused router tail: softmax over experts, top-k, optional renormalisation, in one launch.

Replaces torch's softmax + topk + sum + divide (4-5 launches; ~0.25 ms at 8192 tokens on an H100)
after the router matmul, which stays in cuBLAS. ``route_topk`` also does what the MoE layer did
next in separate launches (cast of the weights, expert-load counting of the real rows, the
logical -> physical slot map when every expert has one replica): at decode sizes each of those
was a kernel of a few microseconds, 9 per layer, and a decode step is launch-bound. With
``pair_sort`` (up to 32 tokens, every expert one replica) the same program also sorts the pairs by
slot for the MoE GEMMs, the MoE's own sort launch then skipped (off by default:
``SORT_IN_ROUTER_MAX_TOKENS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.moe_triton import PairSort, _sort_pairs
from eplb.kernels.pdl import pdl_args, pdl_wait


@triton.jit(do_not_specialize=["T", "n_real"])
def _softmax_topk_kernel(logit_ptr, w_ptr, id_ptr, T, E, stride_l,
                         map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                         counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                         K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BR: tl.constexpr, RENORM: tl.constexpr, HAS_MAP: tl.constexpr,
                         COUNT: tl.constexpr, REAL_PTR: tl.constexpr, USE_PDL: tl.constexpr,
                         SORT: tl.constexpr = False, BM: tl.constexpr = 16, S_PAD: tl.constexpr = 16,
                         J_PAD: tl.constexpr = 2):
    """SORT (with HAS_MAP, one program for all T rows): the program also sorts the pairs by slot
    for the MoE GEMMs (``moe_triton._sort_pairs``: what the MoE's sort launch would write)."""
    pdl_wait(USE_PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < T
    cols = tl.arange(0, E_PAD)
    cm = cols < E
    lg = tl.load(logit_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                 mask=rm[:, None] & cm[None, :], other=float("-inf")).to(tl.float32)
    lg = tl.where(rm[:, None], lg, 0.0)  # rows past T finite: no all-NaN row (numpy's argmax rejects one)
    mx = tl.max(lg, axis=1)
    p = tl.where(cm[None, :], tl.exp(lg - mx[:, None]), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    kc = tl.arange(0, K_PAD)
    wk = tl.zeros((BR, K_PAD), dtype=tl.float32)
    ik = tl.zeros((BR, K_PAD), dtype=tl.int64)
    for j in tl.static_range(K):
        v, idx = tl.max(p, axis=1, return_indices=True)  # one reduction; ties: lowest index
        wk = tl.where(kc[None, :] == j, v[:, None], wk)
        ik = tl.where(kc[None, :] == j, idx[:, None].to(tl.int64), ik)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        wk = wk / tl.sum(wk, axis=1)[:, None]
    om = rm[:, None] & (kc[None, :] < K)
    off = rows[:, None].to(tl.int64) * K + kc[None, :]
    tl.store(w_ptr + off, wk.to(w_ptr.dtype.element_ty), mask=om)
    tl.store(id_ptr + off, ik, mask=om)
    if HAS_MAP:  # slot of the expert's only replica: map[e * stride_map]
        sl = tl.load(map_ptr + ik * stride_map, mask=om, other=-1)
        tl.store(slot_ptr + off, sl, mask=om)
        if SORT:
            n: tl.constexpr = BR * K_PAD
            _sort_pairs(tl.reshape(sl.to(tl.int32), [n]), tl.reshape(om & (sl >= 0), [n]),
                        tl.reshape(rows[:, None] * K + kc[None, :], [n]), counts_ptr, start_ptr, sorted_ptr,
                        block_slot_ptr, num_post_ptr, T * K, n_slots, BM, S_PAD, J_PAD)
    if COUNT:  # load[e] += pairs of rows < n_real routed to e (padding rows are not load)
        if REAL_PTR:
            n_real = tl.load(n_real_ptr)
        cm2 = om & (rows < n_real)[:, None]
        tl.atomic_add(load_ptr + ik, tl.full((BR, K_PAD), 1, tl.int64), mask=cm2, sem="relaxed")


# route_topk sorts the pairs for the MoE itself (``pair_sort``) for at most this many tokens: its
# one program then holds every row
SORT_MAX_TOKENS = 32
# the MoE layer asks for that sort (one launch fewer per layer) on calls of at most this many tokens;
# 0 (off) until measured on a GPU: scripts/dev/ab_decode_fusions.py's ``with_sort_in_router`` sets 32
SORT_IN_ROUTER_MAX_TOKENS = 0


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, descending; ids [T, k] int64), the top-k of
    softmax(logits) in float32, divided by their sum when ``renormalize``."""
    w, ids, _ = route_topk(logits, k, renormalize)
    return w, ids


def route_topk(
    logits: torch.Tensor, k: int, renormalize: bool, *, weight_dtype: torch.dtype = torch.float32,
    slot_map: torch.Tensor | None = None, load: torch.Tensor | None = None,
    num_real: torch.Tensor | int | None = None, pair_sort: PairSort | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The router tail in one launch. logits [T, E] -> (weights [T, k] ``weight_dtype`` (computed
    in float32, rounded once), ids [T, k] int64, slots [T, k] int64 or None).

    ``slot_map`` [E] int64 (may be strided, e.g. column 0 of log2phy): slots = slot_map[ids].
    ``load`` [E] int64: load[e] += pairs routed to e among the first ``num_real`` rows (None: all
    rows; a 0-dim int64 device tensor is read by the kernel, so the count needs no host sync).
    ``pair_sort`` (with ``slot_map``; T <= ``SORT_MAX_TOKENS``): also fill these buffers
    (``moe_triton.new_pair_sort``) with the pairs sorted by slot, for ``fused_moe(...,
    pair_sort=...)``: the MoE's sort launch is saved."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {list(logits.shape)}")
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, {e}], got {k}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    dev = logits.device
    w = torch.empty((t, k), dtype=weight_dtype, device=dev)
    ids = torch.empty((t, k), dtype=torch.int64, device=dev)
    slots = None
    if slot_map is not None:
        if slot_map.dim() != 1 or slot_map.shape[0] != e or slot_map.dtype != torch.int64:
            raise ValueError(f"slot_map must be int64 [{e}], got {slot_map.dtype} {list(slot_map.shape)}")
        slots = torch.empty((t, k), dtype=torch.int64, device=dev)
    if load is not None and (load.dim() != 1 or load.shape[0] != e or load.dtype != torch.int64
                             or not load.is_contiguous()):
        raise ValueError(f"load must be a contiguous int64 [{e}], got {load.dtype} {list(load.shape)}")
    if t == 0:
        return w, ids, slots
    real_ptr = isinstance(num_real, torch.Tensor)
    e_pad = triton.next_power_of_2(e)
    br = max(1, min(16, 4096 // e_pad))
    sort, ps_args = {}, (ids, ids, ids, ids, ids, 0)  # no sort: dummy pointers
    if pair_sort is not None:
        if slots is None or t > SORT_MAX_TOKENS or pair_sort.n_pairs != t * k:
            raise ValueError(f"pair_sort needs a slot_map, at most {SORT_MAX_TOKENS} tokens and a sort made "
                             f"for {t * k} pairs; got {t} tokens, a sort for {pair_sort.n_pairs}")
        br = 16 if t <= 16 else SORT_MAX_TOKENS  # one program: two compiled variants
        sort = dict(SORT=True, BM=pair_sort.bm, S_PAD=triton.next_power_of_2(pair_sort.n_slots),
                    J_PAD=max(2, triton.next_power_of_2(triton.cdiv(t * k, pair_sort.bm))))
        ps_args = (pair_sort.counts, pair_sort.starts, pair_sort.sorted_ids, pair_sort.block_slot,
                   pair_sort.num_post, pair_sort.n_slots)
    _softmax_topk_kernel[(triton.cdiv(t, br),)](
        logits, w, ids, t, e, logits.stride(0),
        slot_map if slots is not None else ids, slot_map.stride(0) if slots is not None else 0,
        slots if slots is not None else ids, load if load is not None else ids,
        num_real if real_ptr else ids, t if num_real is None or real_ptr else int(num_real), *ps_args,
        K=k, K_PAD=triton.next_power_of_2(k), E_PAD=e_pad, BR=br, RENORM=renormalize,
        HAS_MAP=slots is not None, COUNT=load is not None, REAL_PTR=real_ptr, **sort, **pdl_args(dev),
        num_warps=4)
    return w, ids, slots
