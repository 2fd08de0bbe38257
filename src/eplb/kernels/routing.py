"""Fused router tail: softmax over experts, top-k, optional renormalisation, in one launch.

Replaces torch's softmax + topk + sum + divide (4-5 launches; ~0.25 ms at 8192 tokens on an H100)
after the router matmul. ``route_topk`` also does what the MoE layer did next in separate launches
(cast of the weights, expert-load counting of the real rows, the logical -> physical slot map when
every expert has one replica): at decode sizes each of those was a kernel of a few microseconds,
9 per layer, and a decode step is launch-bound. With ``pair_sort`` (up to 32 tokens, every expert
one replica) the same program also sorts the pairs by slot for the MoE GEMMs, the MoE's own sort
launch then skipped (off by default: ``SORT_IN_ROUTER_MAX_TOKENS``).

``route_logits_topk`` adds the router matmul to that launch (up to ``ROUTER_MATMUL_MAX_TOKENS``,
16): the logits are split over experts and over H, every program reads
one small slice of the gate weight in one go (an earlier version looped each program over the whole
H: its serial loads made it no faster than cuBLAS + the tail), and the last program to arrive sums
the float32 partials in a fixed order and runs the tail. (The decoder layer's post-attention
RMSNorm in that launch too, every program recomputing its rows' norms, measured 17-28 us against
11.5-14 for the norm launch + cuBLAS + the tail on an H100, and the FP8 step 1.1 ms slower: removed;
bench/results/ab-router-fusions-h100-80gb-hbm3.json.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, last_to_arrive
from eplb.kernels.moe_triton import PairSort, _sort_pairs
from eplb.kernels.pdl import pdl_args, pdl_wait


@triton.jit
def _route_rows(lg, rows, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BR: tl.constexpr,
                RENORM: tl.constexpr, HAS_MAP: tl.constexpr, COUNT: tl.constexpr, REAL_PTR: tl.constexpr,
                SORT: tl.constexpr, BM: tl.constexpr, S_PAD: tl.constexpr, J_PAD: tl.constexpr):
    """The router tail of ``rows`` [BR] given their logits ``lg`` [BR, E_PAD] (float32; columns past
    E are ignored): weights/ids [T, K], slots [T, K] (HAS_MAP), load counts (COUNT). SORT (with
    HAS_MAP, one program for all T rows): also sorts the pairs by slot for the MoE GEMMs
    (``moe_triton._sort_pairs``: what the MoE's sort launch would write)."""
    rm = rows < T
    cols = tl.arange(0, E_PAD)
    cm = cols < E
    lg = tl.where(cm[None, :], lg, float("-inf"))
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


@triton.jit(do_not_specialize=["T", "n_real"])
def _softmax_topk_kernel(logit_ptr, T, E, stride_l, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr,
                         n_real_ptr, n_real, counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr,
                         n_slots, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BR: tl.constexpr, RENORM: tl.constexpr, HAS_MAP: tl.constexpr,
                         COUNT: tl.constexpr, REAL_PTR: tl.constexpr, USE_PDL: tl.constexpr,
                         SORT: tl.constexpr = False, BM: tl.constexpr = 16, S_PAD: tl.constexpr = 16,
                         J_PAD: tl.constexpr = 2):
    """The tail of rows [pid * BR, (pid + 1) * BR) of logits [T, E]."""
    pdl_wait(USE_PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, E_PAD)
    lg = tl.load(logit_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                 mask=(rows < T)[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
    _route_rows(lg, rows, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                K, K_PAD, E_PAD, BR, RENORM, HAS_MAP, COUNT, REAL_PTR, SORT, BM, S_PAD, J_PAD)


@triton.jit(do_not_specialize=["T", "n_real"])
def _router_kernel(x_ptr, g_ptr, b_ptr, part_ptr, cnt_ptr, T, E, H, stride_x, stride_g,
                   w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                   counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                   BT: tl.constexpr, EB: tl.constexpr, KS: tl.constexpr, KSPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BR: tl.constexpr,
                   RENORM: tl.constexpr, HAS_MAP: tl.constexpr, COUNT: tl.constexpr, REAL_PTR: tl.constexpr,
                   USE_PDL: tl.constexpr, SORT: tl.constexpr, BM: tl.constexpr, S_PAD: tl.constexpr,
                   J_PAD: tl.constexpr):
    """Program (i, j, s): the float32 partial logits of rows [i*BT, (i+1)*BT) x experts
    [j*EB, (j+1)*EB) over H columns [s*KS, (s+1)*KS) into part [KSPLIT, T, E]. The last of all
    programs sums each row's KSPLIT partials in order s = 0, 1, ... (fixed: a row gets the same
    bits in any batch), adds the bias, rounds to x's dtype as F.linear's logits are, and runs the
    tail on all T <= BR rows."""
    pid_t = tl.program_id(0)
    ks_id = tl.program_id(2)
    rows = pid_t * BT + tl.arange(0, BT)
    rm = rows < T
    ex = tl.program_id(1) * EB + tl.arange(0, EB)
    kk = ks_id * KS + tl.arange(0, KS)
    km = kk < H
    b = tl.load(g_ptr + ex[None, :].to(tl.int64) * stride_g + kk[:, None], mask=km[:, None], other=0.0)  # [KS, EB]
    pdl_wait(USE_PDL)  # the weight slice above is read before the wait: no kernel writes it
    a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + kk[None, :], mask=rm[:, None] & km[None, :],
                other=0.0)
    acc = tl.dot(a, b, input_precision=PREC)
    tl.store(part_ptr + (ks_id * T + rows[:, None]).to(tl.int64) * E + ex[None, :], acc, mask=rm[:, None])
    n_prog = tl.num_programs(0) * tl.num_programs(1) * KSPLIT
    if last_to_arrive(cnt_ptr, n_prog):
        rr = tl.arange(0, BR)
        cols = tl.arange(0, E_PAD)
        m = (rr < T)[:, None] & (cols < E)[None, :]
        lg = tl.zeros((BR, E_PAD), dtype=tl.float32)
        for s in tl.static_range(KSPLIT):
            lg += tl.load(part_ptr + (s * T + rr[:, None]).to(tl.int64) * E + cols[None, :], mask=m, other=0.0,
                          cache_modifier=".cg")
        if HAS_BIAS:
            lg += tl.load(b_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)[None, :]
        lg = lg.to(x_ptr.dtype.element_ty).to(tl.float32)
        _route_rows(lg, rr, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                    counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr, n_slots,
                    K, K_PAD, E_PAD, BR, RENORM, HAS_MAP, COUNT, REAL_PTR, SORT, BM, S_PAD, J_PAD)


# route_topk runs one row per one-warp program (its reductions then in-warp shuffles: 2 barriers
# in the sm_90 PTX instead of 9 for 16 rows in 4 warps) on calls of at most this many tokens without
# the pair sort. Full-size FP8 decode step on an H100, two rounds: 3.27 against 3.33 ms at batch 1,
# 11.80 against 11.85 at 32 (bench/results/ab-router-fusions-h100-80gb-hbm3.json)
TAIL_ONE_ROW_MAX_TOKENS = 32
# route_topk sorts the pairs for the MoE itself (``pair_sort``) for at most this many tokens: its
# one program then holds every row
SORT_MAX_TOKENS = 32
# the MoE layer asks for that sort (one launch fewer per layer) on calls of at most this many tokens;
# 0 (off) until measured on a GPU: scripts/dev/ab_decode_fusions.py's ``with_sort_in_router`` sets 32
SORT_IN_ROUTER_MAX_TOKENS = 0
# route_logits_topk's one tail program holds every row: it takes at most this many tokens
ROUTER_MATMUL_TOKENS_CAP = 32
# the MoE layer runs its router matmul in the tail's launch (route_logits_topk) on calls of at most
# this many tokens. With the launch below, full-size FP8 step on an H100 (two rounds): 3.18-3.20
# against 3.26-3.27 ms at batch 1 (bench/results/ab-linear-split-h100-80gb-hbm3.json); with 256
# columns x 4 warps per program up to 32 tokens it had been 0.9 ms slower at batch 32
# (ab-router-fusions-h100-80gb-hbm3.json)
ROUTER_MATMUL_MAX_TOKENS = 16
_BT, _EB = 16, 16  # route_logits_topk's dot tile: token rows x experts, the same for every T
# route_logits_topk's launch: H columns per program (512 bf16 columns x 16 experts = 16 KB of gate
# weight, one load) and warps. scripts/dev/ab_router.py on an H100 (the same file): 6.27 us at 1
# token against 8.79 for 256 x 4 warps and 8.26 for cuBLAS + the tail launch
ROUTER_LAUNCH = {"KS": 512, "num_warps": 8}


def _router_k_slice(h: int) -> int:
    """route_logits_topk's H columns per program: a function of H alone (the summation order must
    not depend on T)."""
    return min(ROUTER_LAUNCH["KS"], max(16, triton.next_power_of_2(h)))


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, descending; ids [T, k] int64), the top-k of
    softmax(logits) in float32, divided by their sum when ``renormalize``."""
    w, ids, _ = route_topk(logits, k, renormalize)
    return w, ids


def _tail_args(t: int, e: int, k: int, renormalize: bool, dev: torch.device, weight_dtype: torch.dtype,
               slot_map: torch.Tensor | None, load: torch.Tensor | None, num_real: torch.Tensor | int | None,
               pair_sort: PairSort | None, max_sort_tokens: int) -> tuple[tuple, tuple, dict]:
    """The one check of the tail's arguments; allocates its outputs -> ((weights, ids, slots), the
    tail's kernel arguments w_ptr .. n_slots, its constexprs but BR)."""
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, {e}], got {k}")
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
    flags = dict(K=k, K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(e), RENORM=renormalize,
                 HAS_MAP=slots is not None, COUNT=load is not None, REAL_PTR=isinstance(num_real, torch.Tensor))
    sort_args = (ids, ids, ids, ids, ids, 0)  # no sort: dummy pointers
    if pair_sort is not None:
        if slots is None or t > max_sort_tokens or pair_sort.n_pairs != t * k:
            raise ValueError(f"pair_sort needs a slot_map, at most {max_sort_tokens} tokens and a sort made "
                             f"for {t * k} pairs; got {t} tokens, a sort for {pair_sort.n_pairs}")
        flags.update(SORT=True, BM=pair_sort.bm, S_PAD=triton.next_power_of_2(pair_sort.n_slots),
                     J_PAD=max(2, triton.next_power_of_2(triton.cdiv(t * k, pair_sort.bm))))
        sort_args = (pair_sort.counts, pair_sort.starts, pair_sort.sorted_ids, pair_sort.block_slot,
                     pair_sort.num_post, pair_sort.n_slots)
    real = num_real if flags["REAL_PTR"] else ids
    args = (w, ids, slot_map if slots is not None else ids, slot_map.stride(0) if slots is not None else 0,
            slots if slots is not None else ids, load if load is not None else ids,
            real, t if num_real is None or flags["REAL_PTR"] else int(num_real), *sort_args)
    return (w, ids, slots), args, flags


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
    outs, args, flags = _tail_args(t, e, k, renormalize, logits.device, weight_dtype, slot_map, load, num_real,
                                   pair_sort, SORT_MAX_TOKENS)
    if t == 0:
        return outs
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    br, warps = max(1, min(16, 4096 // flags["E_PAD"])), 4
    if pair_sort is not None:
        br = 16 if t <= 16 else SORT_MAX_TOKENS  # one program: two compiled variants
    elif t <= TAIL_ONE_ROW_MAX_TOKENS:
        br, warps = 1, 1
    _softmax_topk_kernel[(triton.cdiv(t, br),)](logits, t, e, logits.stride(0), *args, BR=br, **flags,
                                                **pdl_args(logits.device), num_warps=warps)
    return outs


def route_logits_topk(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, k: int, renormalize: bool, *,
    weight_dtype: torch.dtype = torch.float32, slot_map: torch.Tensor | None = None,
    load: torch.Tensor | None = None, num_real: torch.Tensor | int | None = None,
    pair_sort: PairSort | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router matmul and tail in one launch: ``route_topk(F.linear(x, gate_weight, bias), ...)``
    for x [T, H] (T <= ``ROUTER_MATMUL_TOKENS_CAP``), gate_weight [E, H] (x's dtype, E a multiple
    of 16), bias [E] or None. Same return and slot_map/load/num_real/pair_sort as
    :func:`route_topk`.

    The logits are summed in float32 in a fixed order (16 x 16 dot tiles over ``_router_k_slice``
    columns, the slices' partials then in order), the bias added in float32, then rounded to x's
    dtype as F.linear's are: a row's logits get the same bits in any batch, though not cuBLAS's
    bits (its weights too, within batches on the same side of 16 rows: the tail's program holds 16
    rows or 32)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    t, h = x.shape
    if t > ROUTER_MATMUL_TOKENS_CAP:
        raise ValueError(f"x has {t} rows; route_logits_topk takes at most {ROUTER_MATMUL_TOKENS_CAP}")
    if gate_weight.dim() != 2 or gate_weight.shape[1] != h or gate_weight.dtype != x.dtype:
        raise ValueError(f"gate_weight must be {x.dtype} [E, {h}], got {gate_weight.dtype} {list(gate_weight.shape)}")
    e = gate_weight.shape[0]
    if e % _EB:
        raise ValueError(f"gate_weight's expert count must be a multiple of {_EB}, got {e}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != e):
        raise ValueError(f"bias must be [{e}], got {list(bias.shape)}")
    outs, args, flags = _tail_args(t, e, k, renormalize, x.device, weight_dtype, slot_map, load, num_real,
                                   pair_sort, ROUTER_MATMUL_TOKENS_CAP)
    if t == 0:
        return outs
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_weight = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    ks = _router_k_slice(h)
    ksplit = triton.cdiv(h, ks)
    part = torch.empty((ksplit, t, e), dtype=torch.float32, device=x.device)
    _router_kernel[(triton.cdiv(t, _BT), e // _EB, ksplit)](
        x, gate_weight, bias if bias is not None else x, part, arrival_counters(x.device, 1), t, e, h,
        x.stride(0), gate_weight.stride(0), *args, BT=_BT, EB=_EB, KS=ks, KSPLIT=ksplit,
        HAS_BIAS=bias is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        BR=16 if t <= 16 else ROUTER_MATMUL_TOKENS_CAP, **{"SORT": False, "BM": 16, "S_PAD": 16, "J_PAD": 2, **flags},
        **pdl_args(x.device), num_warps=ROUTER_LAUNCH["num_warps"])
    return outs
