"""Fused router tail: softmax over experts, top-k, optional renormalisation, in one launch.

Replaces torch's softmax + topk + sum + divide (4-5 launches; ~0.25 ms at 8192 tokens on an H100)
after the router matmul, which stays in cuBLAS. ``route_topk`` also does what the MoE layer did
next in separate launches (cast of the weights, expert-load counting of the real rows, the
logical -> physical slot map when every expert has one replica): at decode sizes each of those
was a kernel of a few microseconds, 9 per layer, and a decode step is launch-bound.
``route_logits_topk`` adds the router matmul to that launch for decode-sized batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, last_to_arrive

# Batches up to this many rows take route_logits_topk (router matmul + tail in one launch); larger
# ones (prefill) are not launch-bound and keep cuBLAS + route_topk.
ROUTER_FUSED_MAX_TOKENS = 256
_BT, _EB = 16, 16  # route_logits_topk's tile: token rows x experts per program, fixed for every T
# its K step and launch settings (scripts/dev/ab_router.py times the choices); BK must not depend
# on T (the summation order would)
ROUTER_LAUNCH = {"BK": 128, "num_warps": 4, "num_stages": 3}


@triton.jit
def _route_rows(logit_ptr, stride_l, row0, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr,
                n_real_ptr, n_real, K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                BR: tl.constexpr, RENORM: tl.constexpr, HAS_MAP: tl.constexpr, COUNT: tl.constexpr,
                REAL_PTR: tl.constexpr, CACHE: tl.constexpr):
    """The router tail of rows [row0, row0 + BR) of logits [T, E] (read as float32 with
    ``cache_modifier=CACHE``): weights/ids [T, K], slots [T, K] (HAS_MAP), load counts (COUNT)."""
    rows = row0 + tl.arange(0, BR)
    rm = rows < T
    cols = tl.arange(0, E_PAD)
    cm = cols < E
    lg = tl.load(logit_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
                 mask=rm[:, None] & cm[None, :], other=float("-inf"), cache_modifier=CACHE).to(tl.float32)
    lg = tl.where(rm[:, None], lg, 0.0)  # rows past T finite: no all-NaN row (numpy's argmax rejects one)
    mx = tl.max(lg, axis=1)
    p = tl.where(cm[None, :], tl.exp(lg - mx[:, None]), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    kc = tl.arange(0, K_PAD)
    wk = tl.zeros((BR, K_PAD), dtype=tl.float32)
    ik = tl.zeros((BR, K_PAD), dtype=tl.int64)
    for j in tl.static_range(K):
        v = tl.max(p, axis=1)
        idx = tl.argmax(p, axis=1)
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
    if COUNT:  # load[e] += pairs of rows < n_real routed to e (padding rows are not load)
        if REAL_PTR:
            n_real = tl.load(n_real_ptr)
        cm2 = om & (rows < n_real)[:, None]
        tl.atomic_add(load_ptr + ik, tl.full((BR, K_PAD), 1, tl.int64), mask=cm2, sem="relaxed")


@triton.jit(do_not_specialize=["T", "n_real"])
def _softmax_topk_kernel(logit_ptr, T, E, stride_l, w_ptr, id_ptr,
                         map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                         K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BR: tl.constexpr, RENORM: tl.constexpr, HAS_MAP: tl.constexpr,
                         COUNT: tl.constexpr, REAL_PTR: tl.constexpr):
    _route_rows(logit_ptr, stride_l, tl.program_id(0) * BR, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr,
                load_ptr, n_real_ptr, n_real, K, K_PAD, E_PAD, BR, RENORM, HAS_MAP, COUNT, REAL_PTR, "")


@triton.jit(do_not_specialize=["T", "n_real"])
def _router_kernel(x_ptr, g_ptr, b_ptr, lg_ptr, cnt_ptr, T, E, H, stride_x, stride_g,
                   w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr, n_real_ptr, n_real,
                   K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr,
                   EB: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PREC: tl.constexpr, RENORM: tl.constexpr, HAS_MAP: tl.constexpr, COUNT: tl.constexpr,
                   REAL_PTR: tl.constexpr):
    """Program (i, j): logits of rows [i*BT, (i+1)*BT) x experts [j*EB, (j+1)*EB) into the float32
    scratch lg [T, E]; the last of the E/EB programs of token block i runs the tail on its rows."""
    pid_t = tl.program_id(0)
    rows = pid_t * BT + tl.arange(0, BT)
    rm = rows < T
    ex = tl.program_id(1) * EB + tl.arange(0, EB)
    ks = tl.arange(0, BK)
    a_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    b_ptrs = g_ptr + ex[None, :].to(tl.int64) * stride_g + ks[:, None]  # gate_weight^T tile [BK, EB]
    acc = tl.zeros((BT, EB), dtype=tl.float32)
    for k0 in range(0, H, BK):
        if EVEN_K:
            a = tl.load(a_ptrs + k0, mask=rm[:, None], other=0.0)
            b = tl.load(b_ptrs + k0)
        else:
            km = k0 + ks < H
            a = tl.load(a_ptrs + k0, mask=rm[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs + k0, mask=km[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ex).to(tl.float32)[None, :]
    # F.linear's logits are in x's dtype: round once to it, the tail then reads them as float32
    acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(lg_ptr + rows[:, None].to(tl.int64) * E + ex[None, :], acc, mask=rm[:, None])
    if last_to_arrive(cnt_ptr + pid_t, E // EB):
        _route_rows(lg_ptr, E, pid_t * BT, T, E, w_ptr, id_ptr, map_ptr, stride_map, slot_ptr, load_ptr,
                    n_real_ptr, n_real, K, K_PAD, E_PAD, BT, RENORM, HAS_MAP, COUNT, REAL_PTR, ".cg")


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, descending; ids [T, k] int64), the top-k of
    softmax(logits) in float32, divided by their sum when ``renormalize``."""
    w, ids, _ = route_topk(logits, k, renormalize)
    return w, ids


def _tail_args(t: int, e: int, k: int, renormalize: bool, dev: torch.device, weight_dtype: torch.dtype,
               slot_map: torch.Tensor | None, load: torch.Tensor | None,
               num_real: torch.Tensor | int | None) -> tuple[tuple, tuple, dict]:
    """Checks k, slot_map and load, allocates the outputs -> ((weights, ids, slots), the tail's
    kernel arguments w_ptr .. n_real, its constexprs but BR)."""
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
    real_ptr = isinstance(num_real, torch.Tensor)
    args = (w, ids, slot_map if slots is not None else ids, slot_map.stride(0) if slots is not None else 0,
            slots if slots is not None else ids, load if load is not None else ids,
            num_real if real_ptr else ids, t if num_real is None or real_ptr else int(num_real))
    flags = dict(K=k, K_PAD=triton.next_power_of_2(k), E_PAD=triton.next_power_of_2(e), RENORM=renormalize,
                 HAS_MAP=slots is not None, COUNT=load is not None, REAL_PTR=real_ptr)
    return (w, ids, slots), args, flags


def route_topk(
    logits: torch.Tensor, k: int, renormalize: bool, *, weight_dtype: torch.dtype = torch.float32,
    slot_map: torch.Tensor | None = None, load: torch.Tensor | None = None,
    num_real: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The router tail in one launch. logits [T, E] -> (weights [T, k] ``weight_dtype`` (computed
    in float32, rounded once), ids [T, k] int64, slots [T, k] int64 or None).

    ``slot_map`` [E] int64 (may be strided, e.g. column 0 of log2phy): slots = slot_map[ids].
    ``load`` [E] int64: load[e] += pairs routed to e among the first ``num_real`` rows (None: all
    rows; a 0-dim int64 device tensor is read by the kernel, so the count needs no host sync)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {list(logits.shape)}")
    t, e = logits.shape
    outs, args, flags = _tail_args(t, e, k, renormalize, logits.device, weight_dtype, slot_map, load, num_real)
    if t == 0:
        return outs
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    br = max(1, min(16, 4096 // flags["E_PAD"]))
    _softmax_topk_kernel[(triton.cdiv(t, br),)](logits, t, e, logits.stride(0), *args, BR=br, **flags, num_warps=4)
    return outs


def route_logits_topk(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, k: int, renormalize: bool, *,
    weight_dtype: torch.dtype = torch.float32, slot_map: torch.Tensor | None = None,
    load: torch.Tensor | None = None, num_real: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Router matmul and tail in one launch: ``route_topk(F.linear(x, gate_weight, bias), ...)``
    for x [T, H], gate_weight [E, H] (x's dtype, E a multiple of 16), bias [E] or None. Same
    return and slot_map/load/num_real as :func:`route_topk`.

    Logits are summed in float32 in a fixed tile (16 rows x 16 experts, the whole H per program),
    the bias added in float32, then rounded to x's dtype as F.linear's are; a row gets the same
    bits in any batch. For decode sizes (``ROUTER_FUSED_MAX_TOKENS``): one program per 16 experts
    streams its gate rows, and the programs of a row block meet through arrival counters."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    t, h = x.shape
    if gate_weight.dim() != 2 or gate_weight.shape[1] != h or gate_weight.dtype != x.dtype:
        raise ValueError(f"gate_weight must be {x.dtype} [E, {h}], got {gate_weight.dtype} {list(gate_weight.shape)}")
    e = gate_weight.shape[0]
    if e % _EB:
        raise ValueError(f"gate_weight's expert count must be a multiple of {_EB}, got {e}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != e):
        raise ValueError(f"bias must be [{e}], got {list(bias.shape)}")
    outs, args, flags = _tail_args(t, e, k, renormalize, x.device, weight_dtype, slot_map, load, num_real)
    if t == 0:
        return outs
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_weight = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    bk = ROUTER_LAUNCH["BK"] if h >= ROUTER_LAUNCH["BK"] else 64  # a function of H alone, never of T
    tb = triton.cdiv(t, _BT)
    lg = torch.empty((t, e), dtype=torch.float32, device=x.device)
    _router_kernel[(tb, e // _EB)](
        x, gate_weight, bias if bias is not None else x, lg, arrival_counters(x.device, tb), t, e, h,
        x.stride(0), gate_weight.stride(0), *args,
        BT=_BT, EB=_EB, BK=bk, EVEN_K=h % bk == 0, HAS_BIAS=bias is not None,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", **flags,
        num_warps=ROUTER_LAUNCH["num_warps"], num_stages=ROUTER_LAUNCH["num_stages"])
    return outs
