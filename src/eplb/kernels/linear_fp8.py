"""Block-FP8 dense linear (e.g. attention projections of an FP8 checkpoint kept in FP8).

y[M, N] = x[M, K] @ dequant(w)[N, K]^T with w float8_e4m3fn and ``weight_scale_inv`` [N/128, K/128]
per 128x128 block; x is quantized per row and 128-channel group on the fly (same scheme as the
MoE kernels), each 128-deep K step is an FP8 tensor-core dot scaled by activation x weight scale.

Two paths, chosen by the row count M (:func:`_small_config`):

* large M (prefill): one launch quantizes x, a second runs an [M, N]-tiled GEMM looping over all of K.
* small M (decode): the weight read dominates and an [M, N] tiling leaves most SMs idle (N=2048
  with BN=128 is 16 programs for 132 SMs), so the grid is (N tiles, K splits, M tiles): each
  program quantizes its rows of x for its own K range in registers (same arithmetic as
  ``_quant_act_kernel``, so the rounding is identical and no quantization launch is needed) and
  writes a float32 partial [SPLIT, M, N]; the last program of each output tile to finish (an
  atomic counter per tile, reset by that program) sums the partials in split order into y. Grid and
  buffers depend on shapes only, so it is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.moe_triton import FP8_BLOCK, _quant_act_kernel


@triton.jit
def _fp8_linear_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K,
                       stride_xm, stride_xs, stride_wn, stride_sn, stride_ym,
                       BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_size)
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm = offs_m < M
    mn = offs_n < N
    offs_k = tl.arange(0, 128)
    a_ptrs = xq_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, K // 128):
        a = tl.load(a_ptrs, mask=mm[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mn[None, :], other=0.0)
        a_s = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xs + kb, mask=mm, other=0.0)
        if BN <= 128:
            bs = tl.load(ws_ptr + (pid_n * BN // 128) * stride_sn + kb)
            acc += tl.dot(a, b) * (a_s * bs)[:, None]
        else:
            bs = tl.load(ws_ptr + (offs_n // 128) * stride_sn + kb, mask=mn, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * bs[None, :]
        a_ptrs += 128
        b_ptrs += 128
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _fp8_linear_splitk_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, p_ptr, y_ptr, lock_ptr, M, N, KB, kb_per,
                              stride_xm, stride_xs, stride_wn, stride_sn, stride_ym,
                              BM: tl.constexpr, BN: tl.constexpr, PRE_Q: tl.constexpr,
                              REDUCE: tl.constexpr, Q_DT: tl.constexpr):
    """Grid (N/BN, cdiv(KB, kb_per), cdiv(M, BM)); program (n, s, m) covers K blocks
    [s*kb_per, min((s+1)*kb_per, KB)) of 128 channels. BN <= 128 so one weight scale per K block.

    PRE_Q: x is already e4m3 with scales xs [M, KB]; else x is bf16/fp16/fp32 and each program
    quantizes its [BM, 128] slices (one scale per row and block, as ``_quant_act_kernel``).
    REDUCE 0: one split, store y directly. 1: store the float32 partial p[s, M, N] (a separate
    reduction sums them). 2: store the partial, then the last program of this (n, m) tile to
    arrive sums all partials in split order into y and resets the tile's counter in lock_ptr."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm = offs_m < M
    offs_k = tl.arange(0, 128)
    kb0 = pid_s * kb_per
    kb1 = tl.minimum(kb0 + kb_per, KB)
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kb0 * 128 + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + kb0 * 128 + offs_k[:, None]
    bs_ptr = ws_ptr + (pid_n * BN // 128) * stride_sn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(kb0, kb1):
        b = tl.load(b_ptrs)
        bs = tl.load(bs_ptr + kb)
        if PRE_Q:
            a = tl.load(a_ptrs, mask=mm[:, None], other=0.0)
            a_s = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xs + kb, mask=mm, other=0.0)
        else:
            xf = tl.load(a_ptrs, mask=mm[:, None], other=0.0).to(tl.float32)
            a_s = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-12) / 448.0
            a = (xf / a_s[:, None]).to(Q_DT)
        acc += tl.dot(a, b) * (a_s * bs)[:, None]
        a_ptrs += 128
        b_ptrs += 128
    mask = mm[:, None]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if REDUCE == 0:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        offs_mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        mn_total = N.to(tl.int64) * M  # N is a multiple of 128, never a constexpr 1
        tl.store(p_ptr + pid_s * mn_total + offs_mn, acc, mask=mask)
        if REDUCE == 2:
            # all threads' partial stores precede the (release) counter bump; the program that
            # sees SPLIT-1 acquires, so every other split's partial is visible (L2: .cg loads)
            tile = pid_m * tl.num_programs(0) + pid_n
            n_split = tl.num_programs(1)
            tl.debug_barrier()
            arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if arrived == n_split - 1:
                tot = tl.zeros((BM, BN), dtype=tl.float32)
                for s in range(0, n_split):
                    tot += tl.load(p_ptr + s * mn_total + offs_mn, mask=mask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def _splitk_sum_kernel(p_ptr, y_ptr, MN, n_split, BLOCK: tl.constexpr):
    """y.flat[i] = sum_s p[s].flat[i] in split order; y contiguous [M, N], p float32 [S, M, N]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < MN
    tot = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_split):
        tot += tl.load(p_ptr + s * MN + offs, mask=m, other=0.0)
    tl.store(y_ptr + offs, tot.to(y_ptr.dtype.element_ty), mask=m)


# Per-device int32 tile counters for REDUCE=2, all zero between calls (each is reset by the
# program that consumes it). Grown only outside graph capture; replaced buffers stay referenced
# because captured graphs keep their raw pointers.
_LOCKS: dict[torch.device, torch.Tensor] = {}
_OLD_LOCKS: list[torch.Tensor] = []


def _locks(device: torch.device, need: int) -> torch.Tensor | None:
    buf = _LOCKS.get(device)
    if buf is not None and buf.numel() >= need:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # no allocation+memset inside a capture: caller uses the 2-launch reduction
    if buf is not None:
        _OLD_LOCKS.append(buf)
    buf = torch.zeros(max(need, 8192), dtype=torch.int32, device=device)
    _LOCKS[device] = buf
    return buf


def _small_config(m: int, n: int, k: int) -> dict | None:
    """Split-K launch parameters for M rows, or None for the large-M path. Chosen by
    scripts/dev/bench_fp8_linear.py on an H100 (CUDA-graph replay) at Qwen3-30B-A3B's qkv (N=5120,
    K=2048) and o (N=2048, K=4096) shapes.

    BM is 64 even for one row: below 64 rows triton lowers the e4m3 dot to fp16 mma.sync with both
    tiles converted in registers (slower: qkv at M=32 BM=32 took 0.0092 ms vs 0.0079 at M=64
    BM=64), at 64 it is a native e4m3 wgmma and the padding rows cost nothing that matters here.
    K is split only when the output tiles alone leave most of the 132 SMs idle, since partials
    cost a [SPLIT, M, N] float32 round trip (and a second launch unless fused)."""
    if m > SMALL_M_MAX:
        return None
    bm, bn = 64, 64
    kb = k // FP8_BLOCK
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = 1
    if tiles < 80:
        target = 256 if m <= 32 else 128
        while split < kb and tiles * split < target:
            split *= 2
    # quantize x in the kernel (no extra launch) and sum partials in the kernel's last program
    # while x/partials are a few rows; beyond that the redundant per-N-tile work outweighs a launch
    return {"BM": bm, "BN": bn, "kb_per": triton.cdiv(kb, split), "PRE_Q": m > 16,
            "REDUCE": 2 if m <= 16 else 1, "num_warps": 4, "num_stages": 3}


SMALL_M_MAX = 256


def _fp8_linear_splitk(x2: torch.Tensor, weight: torch.Tensor, ws: torch.Tensor, y: torch.Tensor,
                       cfg: dict, q_dt=tl.float8e4nv) -> None:
    """Small-M path into y [M, N] (contiguous). x2 [M, K] contiguous; cfg as :func:`_small_config`.
    ``q_dt`` is the activation quantization dtype; tl.float32 (with a float32 weight, PRE_Q off)
    lets the CPU interpreter check the indexing on unquantized data, as it mishandles e4m3."""
    m, k = x2.shape
    n = weight.shape[0]
    kb = k // FP8_BLOCK
    bm, bn, kb_per = cfg["BM"], cfg["BN"], min(cfg["kb_per"], kb)
    split = triton.cdiv(kb, kb_per)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    reduce = 0 if split == 1 else cfg["REDUCE"]
    locks = None
    if reduce == 2:
        locks = _locks(x2.device, grid[0] * grid[2])
        if locks is None:
            reduce = 1
    if cfg["PRE_Q"]:
        xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
        xs = torch.empty((m, kb), dtype=torch.float32, device=x2.device)
        _quant_act(x2, xq, xs)
        xa, xs_stride = xq, xs.stride(0)
    else:
        xa, xs, xs_stride = x2, x2, 0  # xs unused without PRE_Q
    part = y if reduce == 0 else torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    _fp8_linear_splitk_kernel[grid](
        xa, xs, weight, ws, part, y, locks if locks is not None else part, m, n, kb, kb_per,
        xa.stride(0), xs_stride, weight.stride(0), ws.stride(0), y.stride(0),
        BM=bm, BN=bn, PRE_Q=cfg["PRE_Q"], REDUCE=reduce, Q_DT=q_dt,
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    if reduce == 1:
        block = 1024
        _splitk_sum_kernel[(triton.cdiv(m * n, block),)](part, y, m * n, split, BLOCK=block)


def _quant_act(x2: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor) -> None:
    """x2 [M, K] -> xq [M, K] e4m3, xs [M, K/128] float32 (one launch)."""
    m, k = x2.shape
    g = 4
    _quant_act_kernel[(m, triton.cdiv(k // FP8_BLOCK, g))](
        x2, xq, xs, k, x2.stride(0), xq.stride(0), xs.stride(0), G=g)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, weight_scale_inv [N/128, K/128]
    float32 -> [..., N] in x's dtype. K and N must be multiples of 128."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} != weight's K {k}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if k % FP8_BLOCK or n % FP8_BLOCK:
        raise ValueError(f"block-FP8 linear needs N and K divisible by {FP8_BLOCK}, got N={n}, K={k}")
    if tuple(weight_scale_inv.shape) != (n // FP8_BLOCK, k // FP8_BLOCK):
        raise ValueError(f"weight_scale_inv must be [{n // FP8_BLOCK}, {k // FP8_BLOCK}], "
                         f"got {list(weight_scale_inv.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    ws = weight_scale_inv.contiguous()
    cfg = _small_config(m, n, k)
    if cfg is not None:
        _fp8_linear_splitk(x2, weight, ws, y, cfg)
        return y.view(*lead, n)
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty((m, k // FP8_BLOCK), dtype=torch.float32, device=x.device)
    _quant_act(x2, xq, xs)
    bm = 16 if m <= 16 else 64 if m <= 2048 else 128
    bn = 128
    warps = 8 if bm == 128 else 4
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_linear_kernel[grid](xq, xs, weight, ws, y, m, n, k, xq.stride(0), xs.stride(0),
                             weight.stride(0), ws.stride(0), y.stride(0),
                             BM=bm, BN=bn, GROUP_M=8, num_warps=warps, num_stages=3)
    return y.view(*lead, n)
