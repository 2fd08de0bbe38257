"""Triton fused MoE for one EP rank's local expert slots (bf16 and block-FP8 weights).

Pipeline of one call (6 launches, no host sync, so it can live inside a CUDA graph):
  1. memset of the per-slot counters;
  2. ``_count_kernel``: per (token, k) pair with a local slot, ``rank = atomic_add(counts[slot], 1)``
     -- this is also the load per slot that the caller gets back;
  3. ``_scatter_kernel``: per-slot segments padded to ``BM`` rows, ``sorted[start[slot] + rank] =
     pair``; program 0 fills the padding with a sentinel and writes the slot of each ``BM`` block;
  4. ``_gemm1_kernel``: ``h = silu(x @ w_gate^T) * (x @ w_up^T)`` per pair (gate and up in one
     launch, SwiGLU in the epilogue), written to ``h[pair]``;
  5. ``_gemm2_kernel``: ``y[pair] = (h[pair] @ w2^T) * weight[pair]``;
  6. ``_sum_kernel``: ``out[t] = sum_j y[t, j]`` over the pairs whose slot is local; at decode
     sizes with every pair local (``all_local``) gemm2 does it instead, the last of a token's
     pairs to finish a column tile summing them (a last-arrival counter, same bits).
Calls of at most 2048 pairs (decode, up to 256 tokens at top-8) do 1-3 in one single-CTA launch
(``_align_small_kernel``): 4 launches in all, since at that size launch overhead, not bytes, is the cost.

Size arguments (pair and block counts) are ``do_not_specialize``: Triton would otherwise compile
a variant for each combination of their divisibility by 16, and serving steps, whose sizes change
every step, paid that JIT time inside steps (17-90 ms per mixed step on the H100 before).

Pairs whose slot is -1 (expert not on this rank) never enter the sorted list, so they cost nothing.
Within a slot the order of pairs depends on atomics, but every output row is computed alone, so the
result does not depend on that order.

FP8 (``w13_scale``/``w2_scale`` given): weights are float8_e4m3fn with float32 ``weight_scale_inv``
per 128x128 block. Activations are quantized per token and 128-channel group (scale = amax / 448):
x by one small extra launch (``_quant_act_kernel``) unless the caller passes it quantized
(``x_fp8``, e.g. from the RMSNorm launch that made x); the intermediate h by gemm1's epilogue when
its tile is 128 wide (one group per tile row), otherwise by gemm2 right after each 128-wide load.
Each K step is an FP8 tensor-core dot whose float32 result gets activation scale x weight scale.
Tiles with ``TMA`` (decode sizes) load their FP8 weight tiles through the bulk tensor copy engine
from a host-built tensor descriptor (``_weight_desc``) instead of pointer loads: 1-2% per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, last_to_arrive_each
from eplb.kernels.pdl import pdl_args, pdl_wait, prefetch_rows
from eplb.kernels.tile_table import TABLE

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# ----------------------------------------------------------------------------- alignment

@triton.jit(do_not_specialize=["n_pairs"])
def _count_kernel(slot_ptr, counts_ptr, rank_ptr, n_pairs, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pairs
    s = tl.load(slot_ptr + offs, mask=m, other=-1).to(tl.int32)
    valid = m & (s >= 0)
    r = tl.atomic_add(counts_ptr + s, 1, mask=valid)
    tl.store(rank_ptr + offs, r, mask=valid)


@triton.jit(do_not_specialize=["n_pairs", "max_blocks"])
def _scatter_kernel(slot_ptr, rank_ptr, counts_ptr, sorted_ptr, block_slot_ptr, num_post_ptr,
                    n_pairs, n_slots, max_blocks,
                    BM: tl.constexpr, BLOCK: tl.constexpr, S_PAD: tl.constexpr,
                    BLK_CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    so = tl.arange(0, S_PAD)
    smask = so < n_slots
    c = tl.load(counts_ptr + so, mask=smask, other=0)
    padded = (c + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pairs
    s = tl.load(slot_ptr + offs, mask=m, other=-1).to(tl.int32)
    valid = m & (s >= 0)
    r = tl.load(rank_ptr + offs, mask=valid, other=0)
    # starts[s] gathered through a one-hot compare (register vectors cannot be indexed)
    st = tl.sum(tl.where(s[:, None] == so[None, :], starts[None, :], 0), axis=1)
    tl.store(sorted_ptr + st + r, offs.to(tl.int32), mask=valid)
    # the slot of block b = number of slots whose padded segment ends at or before b*BM
    bo = pid * BLK_CHUNK + tl.arange(0, BLK_CHUNK)
    hit = (ends[None, :] <= bo[:, None] * BM) & smask[None, :]
    tl.store(block_slot_ptr + bo, tl.sum(hit.to(tl.int32), axis=1), mask=bo < max_blocks)
    if pid == 0:
        tl.store(num_post_ptr, tl.sum(padded, 0))
        po = tl.arange(0, BM)
        pos = (starts + c)[:, None] + po[None, :]
        pm = (pos < ends[:, None]) & smask[:, None]
        tl.store(sorted_ptr + pos, tl.zeros([S_PAD, BM], dtype=tl.int32) + n_pairs, mask=pm)


@triton.jit(do_not_specialize=["n_pairs", "max_blocks"])
def _align_small_kernel(slot_ptr, counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr,
                        n_pairs, n_slots, max_blocks,
                        BM: tl.constexpr, N_PAD: tl.constexpr, S_PAD: tl.constexpr,
                        J_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    """memset + _count_kernel + _scatter_kernel in one program, for small calls (decode), where
    launches, not bytes, are the cost. One CTA, so barriers order its phases; the slot starts go
    through ``start_ptr`` (global, L2) and are gathered per pair, and each slot writes the slot id
    of its own blocks: no [pairs x slots] or [blocks x slots] tile, which at 2048 pairs would not
    fit in registers. Blocks past ``num_post`` are left unwritten (the GEMMs never read them)."""
    pdl_wait(USE_PDL)
    offs = tl.arange(0, N_PAD)
    m = offs < n_pairs
    s = tl.load(slot_ptr + offs, mask=m, other=-1).to(tl.int32)
    _sort_pairs(s, m & (s >= 0), offs, counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr,
                n_pairs, n_slots, BM, S_PAD, J_PAD)


@triton.jit
def _sort_pairs(s, valid, pair, counts_ptr, start_ptr, sorted_ptr, block_slot_ptr, num_post_ptr,
                n_pairs, n_slots, BM: tl.constexpr, S_PAD: tl.constexpr, J_PAD: tl.constexpr):
    """The body of ``_align_small_kernel`` for pairs already in registers: slot ids ``s`` (int32),
    ``valid`` and pair indices ``pair``, 1-D tensors of one shape. One program only (its barriers
    order the phases); ``routing.route_topk`` calls it on the slots it has just chosen."""
    so = tl.arange(0, S_PAD)
    smask = so < n_slots
    tl.store(counts_ptr + so, tl.zeros([S_PAD], dtype=tl.int32), mask=smask)
    tl.debug_barrier()
    r = tl.atomic_add(counts_ptr + s, 1, mask=valid)
    tl.debug_barrier()
    c = tl.load(counts_ptr + so, mask=smask, other=0, cache_modifier=".cg")  # L2: atomics' result
    padded = (c + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    tl.store(start_ptr + so, starts, mask=smask)
    tl.debug_barrier()
    st = tl.load(start_ptr + s, mask=valid, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + st + r, pair.to(tl.int32), mask=valid)
    po = tl.arange(0, BM)
    pos = (starts + c)[:, None] + po[None, :]
    pm = (pos < ends[:, None]) & smask[:, None]
    tl.store(sorted_ptr + pos, tl.zeros([S_PAD, BM], dtype=tl.int32) + n_pairs, mask=pm)
    j = tl.arange(0, J_PAD)
    blk = (starts // BM)[:, None] + j[None, :]
    bmask = (blk < (ends // BM)[:, None]) & smask[:, None]
    tl.store(block_slot_ptr + blk, so[:, None] + tl.zeros([S_PAD, J_PAD], dtype=tl.int32), mask=bmask)
    tl.store(num_post_ptr, tl.sum(padded, 0))


# ----------------------------------------------------------------------------- GEMMs

@triton.jit
def _tile_ids(max_m_blocks, n_cols, BN: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M consecutive M blocks share a weight column tile while it is in L2
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n_cols, BN)
    in_group = GROUP_M * num_pid_n
    group_id = pid // in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(max_m_blocks - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_size)
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _quant_rows(a):
    """[BM, 128] tile -> (fp8 tile, float32 scale per row): one 128-channel group per row, scale
    amax / 448. The one statement of the activation quantization: every kernel that quantizes an
    FP8 GEMM's input (this module, the RMSNorm, decode attention) calls it, so their bits agree.
    Both divisions are IEEE-rounded (``div_rn``): triton's ``/`` is approximate on CUDA, and the
    quotient's last bit flipped the e4m3 rounding of about half the elements against torch's
    quantization (reference.quant_dequant_act) on an H100."""
    af = a.to(tl.float32)
    amax = tl.max(tl.abs(af), axis=1)
    s = tl.math.div_rn(tl.maximum(amax, 1e-12), tl.full(amax.shape, 448.0, tl.float32))
    return tl.math.div_rn(af, tl.broadcast_to(s[:, None], af.shape)).to(tl.float8e4nv), s


@triton.jit
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, stride_s,
                      G: tl.constexpr, USE_PDL: tl.constexpr):
    """x [T, H] -> q [T, H] e4m3 and s [T, H/128] float32: one scale per token and 128 channels.
    Grid (T, cdiv(H/128, G))."""
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * G + tl.arange(0, G)
    ch = tl.arange(0, 128)
    offs = grp[:, None] * 128 + ch[None, :]
    m = grp[:, None] < H // 128
    x = tl.load(x_ptr + t * stride_x + offs, mask=m, other=0.0)
    q, sc = _quant_rows(x)
    tl.store(q_ptr + t * stride_q + offs, q, mask=m)
    tl.store(s_ptr + t * stride_s + grp, sc, mask=grp < H // 128)


@triton.jit
def _prefetch_experts(w_ptr, slot_ptr, n_pairs, n_slots, first, step, row0, n_rows, row_len,
                      stride_we, stride_wn, ROWS: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of weight rows [row0, row0 + ROWS) (clamped below n_rows), all row_len elements
    (LINE elements = one 128-byte line), of the slot of pairs first, first + step, ... < n_pairs.
    Called before the PDL wait: the slots come from the router, which finished before the previous
    kernel started, and are read through L2. A wrong guess would only cost a useless prefetch."""
    rows = tl.minimum(row0 + tl.arange(0, ROWS), n_rows - 1).to(tl.int64) * stride_wn
    for p in range(first, n_pairs, step):
        s = tl.load(slot_ptr + p, cache_modifier=".cg").to(tl.int64)
        if (s >= 0) & (s < n_slots):
            prefetch_rows(w_ptr + s * stride_we, rows, row_len, LINE)


@triton.jit(do_not_specialize=["n_pairs", "max_m_blocks"])
def _gemm1_kernel(x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, h_ptr, hs_ptr, sorted_ptr, block_slot_ptr,
                  num_post_ptr, n_pairs, H, I, max_m_blocks,
                  stride_xm, stride_xs, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                  stride_hs, pair_slot_ptr, n_slots,
                  TOP_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  GROUP_M: tl.constexpr, FP8: tl.constexpr, H_FP8: tl.constexpr,
                  EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
                  LINE: tl.constexpr, SWAP: tl.constexpr, TMA: tl.constexpr):
    """SWAP: the dots run transposed (h^T = w @ x^T, weight columns as the MMA's M side): with a
    few pairs per expert, BM rows are below the 64 that Hopper's FP8 tensor-core instruction
    (wgmma) needs, and triton would lower an e4m3 dot of BM < 64 rows to fp16 mma.sync.
    FP8: x is pre-quantized (xs = its scales [T, H/128]); with H_FP8 (BN == 128) the epilogue
    also quantizes h per pair and 128-group (hs [n_pairs, I/128]) so gemm2 reads FP8.
    PREFETCH (small calls under PDL): program (m, n) first prefetches column tile n's gate and up
    rows of pair m's expert (pair_slot_ptr: the unsorted slot per pair), so that the experts'
    weights stream into L2 while the sort runs.
    TMA (SWAP, I % BN == 0): weight tiles come through the bulk tensor copy engine, ``w_desc``
    viewing w as [S * 2I, H] in [BN, BK] boxes."""
    pid_m, pid_n = _tile_ids(max_m_blocks, I, BN, GROUP_M)
    if PREFETCH:
        _prefetch_experts(w_ptr, pair_slot_ptr, n_pairs, n_slots, pid_m, max_m_blocks, pid_n * BN, I, H,
                          stride_we, stride_wn, BN, LINE)
        _prefetch_experts(w_ptr, pair_slot_ptr, n_pairs, n_slots, pid_m, max_m_blocks, I + pid_n * BN, 2 * I,
                          H, stride_we, stride_wn, BN, LINE)
    pdl_wait(USE_PDL)
    num_post = tl.load(num_post_ptr)
    if pid_m * BM >= num_post:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    mask_m = pair < n_pairs
    tok = (pair // TOP_K).to(tl.int64)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BK)
    if SWAP:
        a_ptrs = x_ptr + tok[None, :] * stride_xm + offs_k[:, None]  # x^T tile [BK, BM]
        g_ptrs = w_ptr + slot * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc_g = tl.zeros((BN, BM), dtype=tl.float32)
        acc_u = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
        g_ptrs = w_ptr + slot * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    u_ptrs = g_ptrs + I * stride_wn
    if FP8:
        as_ptrs = xs_ptr + tok * stride_xs
        sg_ptrs = ws_ptr + slot * stride_se + (offs_n // 128) * stride_sn
        su_ptrs = ws_ptr + slot * stride_se + ((offs_n + I) // 128) * stride_sn
    if TMA:
        w_row = slot.to(tl.int32) * (2 * I) + pid_n * BN
    for kb in range(0, tl.cdiv(H, BK)):
        if TMA:
            a = tl.load(a_ptrs, mask=mask_m[None, :], other=0.0)
            g = w_desc.load([w_row, kb * BK])
            u = w_desc.load([w_row + I, kb * BK])
        elif SWAP:
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=mask_n[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                km = offs_k < H - kb * BK
                a = tl.load(a_ptrs, mask=mask_m[None, :] & km[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=mask_n[:, None] & km[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=mask_n[:, None] & km[None, :], other=0.0)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=mask_n[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            km = offs_k < H - kb * BK
            a = tl.load(a_ptrs, mask=mask_m[:, None] & km[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=mask_n[None, :] & km[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=mask_n[None, :] & km[:, None], other=0.0)
        if FP8:
            a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
            if BN <= 128:
                # the tile lies in one 128-row weight block: one scale, folded into the row scale
                # so the promotion is a single FMA per element
                sg = tl.load(ws_ptr + slot * stride_se + (pid_n * BN // 128) * stride_sn + kb)
                su = tl.load(ws_ptr + slot * stride_se + ((pid_n * BN + I) // 128) * stride_sn + kb)
                if SWAP:
                    acc_g += tl.dot(g, a) * (a_s * sg)[None, :]
                    acc_u += tl.dot(u, a) * (a_s * su)[None, :]
                else:
                    acc_g += tl.dot(a, g) * (a_s * sg)[:, None]
                    acc_u += tl.dot(a, u) * (a_s * su)[:, None]
            else:
                sg = tl.load(sg_ptrs + kb, mask=mask_n, other=0.0)
                su = tl.load(su_ptrs + kb, mask=mask_n, other=0.0)
                if SWAP:
                    acc_g += tl.dot(g, a) * sg[:, None] * a_s[None, :]
                    acc_u += tl.dot(u, a) * su[:, None] * a_s[None, :]
                else:
                    acc_g += tl.dot(a, g) * a_s[:, None] * sg[None, :]
                    acc_u += tl.dot(a, u) * a_s[:, None] * su[None, :]
        elif SWAP:
            acc_g = tl.dot(g, a, acc_g)
            acc_u = tl.dot(u, a, acc_u)
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BK
        g_ptrs += BK
        u_ptrs += BK
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    if SWAP:
        h = tl.trans(h)  # [BM, BN]: one row per pair, as the quantization and the store expect
    h_ptrs = h_ptr + pair[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    if H_FP8:
        hq, h_s = _quant_rows(h)
        tl.store(h_ptrs, hq, mask=mask_m[:, None] & mask_n[None, :])
        tl.store(hs_ptr + pair.to(tl.int64) * stride_hs + pid_n, h_s, mask=mask_m)
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["n_pairs", "max_m_blocks"])
def _gemm2_kernel(h_ptr, hs_ptr, w_ptr, w_desc, ws_ptr, y_ptr, weight_ptr, sorted_ptr, block_slot_ptr,
                  num_post_ptr, n_pairs, H, I, max_m_blocks,
                  stride_hm, stride_hs, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
                  pair_slot_ptr, n_slots, out_ptr, cnt_ptr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  FP8: tl.constexpr, H_FP8: tl.constexpr, EVEN_K: tl.constexpr,
                  MUL_WEIGHT: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
                  LINE: tl.constexpr, SWAP: tl.constexpr, TMA: tl.constexpr, SUM_K: tl.constexpr):
    """SWAP, TMA (``w_desc``: w as [S * H, I]): as in _gemm1_kernel. FP8: h is either FP8 with
    scales hs (H_FP8) or bf16, quantized per row right after each 128-wide load. PREFETCH: as in
    _gemm1_kernel, the down rows, while gemm1 runs.
    SUM_K (every pair local, SUM_K = top-k): the sum over k is done here instead of by
    _sum_kernel, one launch fewer. Each program arrives, per row, at the counter of (token,
    column tile); the last of the token's SUM_K pairs to arrive sums their y rows in k order, as
    _sum_kernel does (same bits), into out_ptr, and resets the counter (kernels.arrival)."""
    pid_m, pid_n = _tile_ids(max_m_blocks, H, BN, GROUP_M)
    if PREFETCH:
        _prefetch_experts(w_ptr, pair_slot_ptr, n_pairs, n_slots, pid_m, max_m_blocks, pid_n * BN, H, I,
                          stride_we, stride_wn, BN, LINE)
    pdl_wait(USE_PDL)
    num_post = tl.load(num_post_ptr)
    if pid_m * BM >= num_post:
        return
    offs_m = pid_m * BM + tl.arange(0, BM)
    pair = tl.load(sorted_ptr + offs_m)
    mask_m = pair < n_pairs
    row = pair.to(tl.int64)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < H
    offs_k = tl.arange(0, BK)
    a_ptrs = h_ptr + row[:, None] * stride_hm + offs_k[None, :]
    if SWAP:
        b_ptrs = w_ptr + slot * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    else:
        b_ptrs = w_ptr + slot * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    if FP8:
        s_ptrs = ws_ptr + slot * stride_se + (offs_n // 128) * stride_sn
    if H_FP8:
        as_ptrs = hs_ptr + row * stride_hs
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)
    if TMA:
        w_row = slot.to(tl.int32) * H + pid_n * BN
    for kb in range(0, tl.cdiv(I, BK)):
        # a: h tile [BM, BK]; b: w2 tile [BK, BN], or [BN, BK] with SWAP (acc is then [BN, BM])
        if TMA:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = w_desc.load([w_row, kb * BK])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] if SWAP else mask_n[None, :], other=0.0)
        else:
            km = offs_k < I - kb * BK
            a = tl.load(a_ptrs, mask=mask_m[:, None] & km[None, :], other=0.0)
            bmask = (mask_n[:, None] & km[None, :]) if SWAP else (mask_n[None, :] & km[:, None])
            b = tl.load(b_ptrs, mask=bmask, other=0.0)
        if FP8:
            if H_FP8:
                aq = a
                a_s = tl.load(as_ptrs + kb, mask=mask_m, other=0.0)
            else:
                aq, a_s = _quant_rows(a)
            if BN <= 128:
                bs = tl.load(ws_ptr + slot * stride_se + (pid_n * BN // 128) * stride_sn + kb)
                if SWAP:
                    acc += tl.dot(b, tl.trans(aq)) * (a_s * bs)[None, :]
                else:
                    acc += tl.dot(aq, b) * (a_s * bs)[:, None]
            else:
                bs = tl.load(s_ptrs + kb, mask=mask_n, other=0.0)
                if SWAP:
                    acc += tl.dot(b, tl.trans(aq)) * bs[:, None] * a_s[None, :]
                else:
                    acc += tl.dot(aq, b) * a_s[:, None] * bs[None, :]
        elif SWAP:
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    if SWAP:
        acc = tl.trans(acc)
    if MUL_WEIGHT:
        wt = tl.load(weight_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    y_ptrs = y_ptr + row[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if SUM_K:
        tok = row // SUM_K
        last = last_to_arrive_each(cnt_ptr + tok * tl.cdiv(H, BN) + pid_n, SUM_K, mask_m)
        if tl.max(last.to(tl.int32), axis=0) > 0:
            lm = last[:, None] & mask_n[None, :]
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for j in tl.static_range(SUM_K):  # k order, float32: _sum_kernel's sum
                v = tl.load(y_ptr + (tok * SUM_K + j)[:, None] * stride_ym + offs_n[None, :], mask=lm,
                            other=0.0, cache_modifier=".cg")
                tot += v.to(tl.float32)
            tl.store(out_ptr + tok[:, None] * H + offs_n[None, :], tot.to(out_ptr.dtype.element_ty), mask=lm)


@triton.jit
def _sum_kernel(y_ptr, slot_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        s = tl.load(slot_ptr + t * TOP_K + j)
        if s >= 0:  # a pair of another rank (slot -1) adds nothing
            v = tl.load(y_ptr + (t * TOP_K + j) * H + offs, mask=hm, other=0.0)
            acc += v.to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=hm)


# ----------------------------------------------------------------------------- tile table

def get_config(n_pairs: int, fp8: bool) -> dict:
    """Tile config for a call with ``n_pairs`` (token, k) pairs: the table entry with the largest
    key <= n_pairs (keys are pair counts; Qwen3-30B-A3B routes 8 pairs per token)."""
    table = TABLE["fp8" if fp8 else "bf16"]
    keys = sorted(int(k) for k in table)
    best = keys[0]
    for k in keys:
        if k <= n_pairs:
            best = k
    return table[str(best)]


# ----------------------------------------------------------------------------- entry points

def _check(x, topk_slot, w13, w2, w13_scale, w2_scale):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {list(x.shape)}")
    if topk_slot.dim() != 2 or topk_slot.shape[0] != x.shape[0]:
        raise ValueError(f"topk_slot must be [T, k] with T={x.shape[0]}, got {list(topk_slot.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("w13 must be [S, 2I, H] and w2 [S, H, I]")
    s, i2, h = w13.shape
    if h != x.shape[1] or w2.shape != (s, h, i2 // 2) or i2 % 2:
        raise ValueError(
            f"shape mismatch: x {list(x.shape)}, w13 {list(w13.shape)} (want [S, 2I, H]), "
            f"w2 {list(w2.shape)} (want [S, H, I])")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("w13_scale and w2_scale must be given together (block-FP8) or not at all")
    fp8 = w13_scale is not None
    if fp8:
        i = i2 // 2
        if i % FP8_BLOCK or h % FP8_BLOCK:
            raise ValueError(f"block-FP8 needs H and I divisible by {FP8_BLOCK}, got H={h}, I={i}")
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"block-FP8 weights must be float8_e4m3fn, got {w13.dtype}, {w2.dtype}")
        if tuple(w13_scale.shape) != (s, i2 // FP8_BLOCK, h // FP8_BLOCK) or \
                tuple(w2_scale.shape) != (s, h // FP8_BLOCK, i // FP8_BLOCK):
            raise ValueError(
                f"w13_scale must be [S, 2I/128, H/128] and w2_scale [S, H/128, I/128], got "
                f"{list(w13_scale.shape)}, {list(w2_scale.shape)}")
    elif w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"weights must have x's dtype {x.dtype}, got {w13.dtype}, {w2.dtype}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    return fp8


# columns per program of the final sum over k (programs = tokens x H / SUM_BLOCK_H)
SUM_BLOCK_H = 1024
# calls of at most this many tokens with every pair local sum over k inside gemm2 (decode sizes,
# where a launch costs more than the sum). Full-size FP8 step on an H100, separate launch -> in
# gemm2: batch 1 3.88 -> 3.76 ms, 32 12.74 -> 12.65, but 256 19.63 -> 19.71
# (bench/results/ab-sum-in-gemm2-h100-80gb-hbm3.json); ab_decode_fusions' ``with_sum_in_gemm2`` sets 256
SUM_IN_GEMM2_MAX_TOKENS = 32
# calls with at most this many pairs (and slots) sort in one single-CTA launch
SMALL_ALIGN_MAX_PAIRS = 2048
SMALL_ALIGN_MAX_SLOTS = 256
# under PDL a GEMM may prefetch its experts' weights into L2 when they are at most this many bytes
# (counting one expert per pair, at most one per slot): about half the L2 of an H100/H200 (50 MB),
# so the prefetched lines are still there when the GEMM reads them. FP8 at batch 1 (8 pairs):
# gate/up 25 MB, down 12.6 MB; bf16 at batch 1 only down. 0 (off): PDL was faster without the
# prefetch (pdl.py); ab_decode_fusions' ``with_prefetch`` sets 32 MB
PREFETCH_MAX_BYTES = 0


def _weight_desc(w, c, fp8, rows_per_part, bk):
    """The bulk-copy descriptor of a GEMM's weights [S, N, K] as [S * N, K] in [BN, BK] boxes, or
    None (pointer loads). A tile's ``TMA`` is a request, honoured where it applies: transposed FP8
    tiles that never straddle a slot or a gate/up half (``rows_per_part`` % BN == 0), with the
    slots back to back; a table entry thus never fails a call. ``fp8_linear`` passes its [N, K]
    weight as one slot."""
    if not (c.get("TMA", False) and fp8 and c.get("SWAP", False)) or rows_per_part % c["BN"]:
        return None
    s, n, k = w.shape
    if w.stride(0) != n * w.stride(1) or w.stride(2) != 1 or w.data_ptr() % 16:  # TMA: 16-byte aligned base
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(w, [s * n, k], [w.stride(1), 1], [c["BN"], bk])


class PairSort(NamedTuple):
    """The slot-sorted pair layout the GEMMs read, for ``n_pairs`` pairs over ``n_slots`` slots at
    row block ``bm``: made by ``_run``'s sort launch, or already by ``routing.route_topk``."""
    sorted_ids: torch.Tensor  # [max_blocks * bm] int32: pair per sorted row (n_pairs: padding)
    block_slot: torch.Tensor  # [max_blocks] int32: slot of each row block
    num_post: torch.Tensor  # [1] int32: sorted rows in use
    counts: torch.Tensor  # [n_slots] int32: pairs per slot
    starts: torch.Tensor  # [n_slots] int32: first sorted row of each slot
    bm: int
    n_pairs: int
    n_slots: int

    @property
    def max_blocks(self) -> int:
        return self.block_slot.shape[0]


def new_pair_sort(n_pairs: int, n_slots: int, fp8: bool, device: torch.device,
                  config: dict | None = None) -> PairSort:
    """Empty buffers of the pair layout of a call of ``n_pairs`` pairs (its tile table entry's BM)."""
    bm = (config or get_config(n_pairs, fp8))["BM"]
    max_blocks = triton.cdiv(n_pairs, bm) + min(n_pairs, n_slots)
    i32 = dict(dtype=torch.int32, device=device)
    return PairSort(torch.empty(max_blocks * bm, **i32), torch.empty(max_blocks, **i32), torch.empty(1, **i32),
                    torch.empty(n_slots, **i32), torch.empty(n_slots, **i32), bm, n_pairs, n_slots)


def small_sort_fits(n_pairs: int, n_slots: int) -> bool:
    """The single-program sort takes this call (its registers hold every pair and slot)."""
    return n_pairs <= SMALL_ALIGN_MAX_PAIRS and n_slots <= SMALL_ALIGN_MAX_SLOTS


def _run(x, topk_slot, topk_weight, w13, w2, w13_scale, w2_scale, config, zero_y=False, x_fp8=None,
         out=None, pair_sort=None):
    """-> (y [T*k, H] per-pair outputs, counts [S] int32). Rows of non-local pairs are left
    unwritten, or zero with ``zero_y``. ``x_fp8``: (q, scales), x already quantized (FP8).
    ``out`` [T, H]: gemm2 also sums over k into it (``_gemm2_kernel``'s SUM_K; every pair local).
    ``pair_sort``: the pairs already sorted (``routing.route_topk``), so no sort launch here."""
    fp8 = _check(x, topk_slot, w13, w2, w13_scale, w2_scale)
    x = x.contiguous()
    t, k = topk_slot.shape
    s_local, i2, h = w13.shape
    i = i2 // 2
    n_pairs = t * k
    slots = topk_slot.contiguous().view(-1)
    cfg = config or get_config(n_pairs, fp8)
    bm = cfg["BM"]
    dev = x.device

    y = (torch.zeros if zero_y else torch.empty)((n_pairs, h), dtype=x.dtype, device=dev)
    if n_pairs == 0 or s_local == 0:
        return y, torch.zeros(s_local, dtype=torch.int32, device=dev)
    s_pad = triton.next_power_of_2(s_local)
    pdl = pdl_args(dev)
    experts = min(n_pairs, s_local)  # at most this many distinct slots are read
    prefetch1 = pdl["USE_PDL"] and experts * w13[0].numel() * w13.element_size() <= PREFETCH_MAX_BYTES
    prefetch2 = pdl["USE_PDL"] and experts * w2[0].numel() * w2.element_size() <= PREFETCH_MAX_BYTES
    if pair_sort is not None and (pair_sort.bm, pair_sort.n_pairs, pair_sort.n_slots) != (bm, n_pairs, s_local):
        raise ValueError(f"pair_sort is for BM {pair_sort.bm}, {pair_sort.n_pairs} pairs, {pair_sort.n_slots} "
                         f"slots; this call has BM {bm}, {n_pairs} pairs, {s_local} slots")
    sort = pair_sort if pair_sort is not None else new_pair_sort(n_pairs, s_local, fp8, dev, cfg)
    sorted_ids, block_slot, num_post, counts = sort[:4]
    max_blocks = sort.max_blocks
    if pair_sort is not None:
        pass  # sorted by the router launch
    elif small_sort_fits(n_pairs, s_local):
        _align_small_kernel[(1,)](
            slots, counts, sort.starts, sorted_ids, block_slot, num_post, n_pairs, s_local, max_blocks,
            BM=bm, N_PAD=max(16, triton.next_power_of_2(n_pairs)), S_PAD=s_pad,
            J_PAD=max(2, triton.next_power_of_2(triton.cdiv(n_pairs, bm))), **pdl, num_warps=8)
    else:
        counts.zero_()
        rank = torch.empty(n_pairs, dtype=torch.int32, device=dev)
        _count_kernel[(triton.cdiv(n_pairs, 1024),)](slots, counts, rank, n_pairs, BLOCK=1024,
                                                     **pdl)
        blk = max(16, min(256, 8192 // s_pad))
        chunk = max(16, min(128, 8192 // s_pad))
        grid = (max(triton.cdiv(n_pairs, blk), triton.cdiv(max_blocks, chunk)),)
        _scatter_kernel[grid](
            slots, rank, counts, sorted_ids, block_slot, num_post, n_pairs, s_local, max_blocks,
            BM=bm, BLOCK=blk, S_PAD=s_pad, BLK_CHUNK=chunk, **pdl)

    c1, c2 = cfg["gemm1"], cfg["gemm2"]
    bk1 = FP8_BLOCK if fp8 else c1["BK"]
    bk2 = FP8_BLOCK if fp8 else c2["BK"]
    desc1 = _weight_desc(w13, c1, fp8, i, bk1)
    desc2 = _weight_desc(w2, c2, fp8, h, bk2)
    # FP8 with 128-wide gate/up tiles: gemm1 quantizes h in its epilogue (one group per tile row)
    h_fp8 = fp8 and c1["BN"] == FP8_BLOCK
    if fp8 and x_fp8 is not None:
        xq, xs = x_fp8
        if (xq.shape != x.shape or xq.dtype != torch.float8_e4m3fn or xq.stride(-1) != 1
                or xs.shape != (t, h // FP8_BLOCK) or xs.dtype != torch.float32):
            raise ValueError(f"x_fp8 must be (float8_e4m3fn {list(x.shape)}, float32 [{t}, {h // FP8_BLOCK}])")
        ws13, ws2 = w13_scale, w2_scale
    elif fp8:
        xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
        xs = torch.empty((t, h // FP8_BLOCK), dtype=torch.float32, device=dev)
        g = 4
        _quant_act_kernel[(t, triton.cdiv(h // FP8_BLOCK, g))](
            x, xq, xs, h, x.stride(0), xq.stride(0), xs.stride(0), G=g, **pdl)
        ws13, ws2 = w13_scale, w2_scale
    else:
        xq, xs = x, x  # xs, ws13, ws2: dummy pointers when unused
        ws13, ws2 = w13, w2
    hbuf = torch.empty((n_pairs, i), dtype=torch.float8_e4m3fn if h_fp8 else x.dtype, device=dev)
    hs = torch.empty((n_pairs, i // FP8_BLOCK), dtype=torch.float32, device=dev) if h_fp8 else hbuf
    grid1 = (max_blocks * triton.cdiv(i, c1["BN"]),)
    _gemm1_kernel[grid1](
        xq, xs, w13, desc1, ws13, hbuf, hs, sorted_ids, block_slot, num_post, n_pairs, h, i, max_blocks,
        xq.stride(0), xs.stride(0) if fp8 else 0, w13.stride(0), w13.stride(1),
        ws13.stride(0) if fp8 else 0, ws13.stride(1) if fp8 else 0, hbuf.stride(0),
        hs.stride(0) if h_fp8 else 0, slots, s_local,
        TOP_K=k, BM=bm, BN=c1["BN"], BK=bk1, GROUP_M=c1["GROUP_M"], FP8=fp8, H_FP8=h_fp8,
        EVEN_K=(h % bk1 == 0), **pdl, PREFETCH=prefetch1, LINE=128 // w13.element_size(),
        SWAP=c1.get("SWAP", False), TMA=desc1 is not None, num_warps=c1["num_warps"],
        num_stages=c1["num_stages"])
    wflat = topk_weight.contiguous().view(-1) if topk_weight is not None else y
    grid2 = (max_blocks * triton.cdiv(h, c2["BN"]),)
    cnt = arrival_counters(dev, t * triton.cdiv(h, c2["BN"])) if out is not None else y
    _gemm2_kernel[grid2](
        hbuf, hs, w2, desc2, ws2, y, wflat, sorted_ids, block_slot, num_post, n_pairs, h, i, max_blocks,
        hbuf.stride(0), hs.stride(0) if h_fp8 else 0, w2.stride(0), w2.stride(1),
        ws2.stride(0) if fp8 else 0, ws2.stride(1) if fp8 else 0, y.stride(0), slots, s_local,
        out if out is not None else y, cnt, BM=bm, BN=c2["BN"], BK=bk2, GROUP_M=c2["GROUP_M"], FP8=fp8, H_FP8=h_fp8,
        EVEN_K=(i % bk2 == 0), MUL_WEIGHT=topk_weight is not None, **pdl,
        PREFETCH=prefetch2, LINE=128 // w2.element_size(), SWAP=c2.get("SWAP", False), TMA=desc2 is not None,
        SUM_K=k if out is not None else 0, num_warps=c2["num_warps"], num_stages=c2["num_stages"])
    return y, counts


def fused_moe(x: torch.Tensor, topk_slot: torch.Tensor, topk_weight: torch.Tensor,
              w13: torch.Tensor, w2: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, return_load: bool = False,
              config: dict | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
              all_local: bool = False, pair_sort: PairSort | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted MoE output of this rank's local slots.

    x [T, H] bf16; topk_slot [T, k] int (local slot index, -1 = not on this rank); topk_weight
    [T, k]; w13 [S, 2I, H] (gate rows then up rows), w2 [S, H, I]; block-FP8: weights
    float8_e4m3fn and w13_scale [S, 2I/128, H/128], w2_scale [S, H/128, I/128] float32
    (``weight_scale_inv``). Returns out [T, H] = sum over local pairs of weight * expert(x), and with
    ``return_load`` also counts [S] int32: pairs routed to each local slot. ``x_fp8`` (block-FP8
    weights only): x already quantized per row and 128 columns (q [T, H] e4m3, scales [T, H/128]
    float32, e.g. from ``rms_norm_fused(..., fp8=True)``); x itself is then not read.
    ``all_local``: the caller knows that no slot is -1 (in-process experts); calls of at most
    ``SUM_IN_GEMM2_MAX_TOKENS`` tokens then sum over k in the down-projection launch.
    ``pair_sort``: the pairs already sorted by slot (``route_topk(..., pair_sort=...)``).
    """
    t, k = topk_slot.shape
    h = x.shape[1]
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    in_gemm2 = all_local and 0 < t <= SUM_IN_GEMM2_MAX_TOKENS and w13.shape[0] > 0
    y, counts = _run(x, topk_slot, topk_weight, w13, w2, w13_scale, w2_scale, config, x_fp8=x_fp8,
                     out=out if in_gemm2 else None, pair_sort=pair_sort)
    if t and not in_gemm2:
        bh = SUM_BLOCK_H
        _sum_kernel[(t, triton.cdiv(h, bh))](y, topk_slot.contiguous(), out, h, TOP_K=k, BLOCK_H=bh,
                                             **pdl_args(x.device), num_warps=max(1, min(4, bh // 256)))
    return (out, counts) if return_load else out


def fused_moe_pairs(x: torch.Tensor, topk_slot: torch.Tensor, topk_weight: torch.Tensor | None,
                    w13: torch.Tensor, w2: torch.Tensor, *, w13_scale: torch.Tensor | None = None,
                    w2_scale: torch.Tensor | None = None, return_load: bool = False,
                    config: dict | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-pair outputs [T, k, H]: expert(x[t]) for pair (t, j), times topk_weight[t, j] when
    weights are given; zero where topk_slot is -1. Same arguments as :func:`fused_moe`."""
    y, counts = _run(x, topk_slot, topk_weight, w13, w2, w13_scale, w2_scale, config, zero_y=True)
    t, k = topk_slot.shape
    y = y.view(t, k, x.shape[1])
    return (y, counts) if return_load else y


def fused_experts(x: torch.Tensor, local_slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  *, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """The MoELayer ``expert_fn`` contract: x [N, H], local_slot [N] -> [N, H], row n run through
    the expert in local slot ``local_slot[n]`` (unweighted; -1 gives a zero row)."""
    if local_slot.dim() != 1 or local_slot.shape[0] != x.shape[0]:
        raise ValueError(f"local_slot must be [N] with N={x.shape[0]}, got {list(local_slot.shape)}")
    y = fused_moe_pairs(x, local_slot.view(-1, 1), None, w13, w2, w13_scale=w13_scale,
                        w2_scale=w2_scale, config=config)
    return y.view(x.shape[0], x.shape[1])
