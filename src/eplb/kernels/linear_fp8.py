"""Block-FP8 dense linear (e.g. attention projections of an FP8 checkpoint kept in FP8).

y[M, N] = x[M, K] @ dequant(w)[N, K]^T with w float8_e4m3fn and ``weight_scale_inv`` [N/128, K/128]
per 128x128 block; x is quantized per row and 128-channel group on the fly (same scheme as the
MoE kernels), each 128-deep K step is an FP8 tensor-core dot scaled by activation x weight scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, last_to_arrive
from eplb.kernels.moe_triton import FP8_BLOCK, _quant_act_kernel, _weight_desc
from eplb.kernels.pdl import pdl_args, pdl_wait, prefetch_rows


@triton.jit(do_not_specialize=["M"])
def _fp8_linear_kernel(x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K,
                       stride_xm, stride_xs, stride_wn, stride_sn, stride_ym,
                       BM: tl.constexpr, BN: tl.constexpr, KSUB: tl.constexpr, GROUP_M: tl.constexpr,
                       USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, SWAP: tl.constexpr,
                       TMA: tl.constexpr, SPLIT: tl.constexpr):
    """KSUB 128-deep blocks per loop iteration: at decode sizes a program streams a narrow weight
    tile, and more independent loads in flight per SM is what reaches the read rate.
    PREFETCH (with USE_PDL): the program's weight rows go to L2 before it waits for the previous
    kernel, so that they stream in while that kernel finishes.
    SWAP (BN >= 64): the dots run transposed (y^T = w x^T), the weight tile on the MMA's M side,
    so that an e4m3 dot of BM < 64 rows can use wgmma (as moe_triton's SWAP tiles). TMA (with
    SWAP): weight tiles through the bulk tensor copy engine, ``w_desc`` = w in [BN, 128] boxes.
    SPLIT > 1 (split-K): SPLIT programs per output tile, each one K range of the same loop; each
    stores its float32 partial in ``part_ptr`` [SPLIT, M, N] and the last to arrive at the tile's
    counter (``cnt_ptr``, kernels.arrival) sums them in split order. At decode sizes an unsplit
    grid can have too few programs to stream the weight at the read rate (o at batch 1: 16
    128-wide tiles for 132 SMs)."""
    pid = tl.program_id(0)
    split = pid % SPLIT
    pid = pid // SPLIT
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
    per_split = K // (128 * KSUB * SPLIT)  # loop iterations of one program (the host checks the division)
    kb0 = split * per_split
    if PREFETCH:  # weights are written by no kernel: safe to read before the wait
        prefetch_rows(w_ptr + kb0 * 128 * KSUB, tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn,
                      per_split * 128 * KSUB, 128)  # 128 FP8 = a line
    pdl_wait(USE_PDL)
    offs_k = kb0 * 128 * KSUB + tl.arange(0, 128)
    if SWAP:  # x^T [128, BM] and w [BN, 128]
        a_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
        b_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    else:
        a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    as_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xs
    if BN <= 128:  # the tile lies in one 128-row weight block: one scale per K block
        s_ptrs = ws_ptr + (pid_n * BN // 128) * stride_sn
    else:
        s_ptrs = ws_ptr + (offs_n // 128) * stride_sn
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)
    for kb in range(kb0, kb0 + per_split):
        for j in tl.static_range(KSUB):
            kk = kb * KSUB + j
            a_s = tl.load(as_ptrs + kk, mask=mm, other=0.0)
            if SWAP:
                a = tl.load(a_ptrs + j * 128, mask=mm[None, :], other=0.0)
                if TMA:
                    b = w_desc.load([pid_n * BN, kk * 128])
                else:
                    b = tl.load(b_ptrs + j * 128, mask=mn[:, None], other=0.0)
                if BN <= 128:
                    acc += tl.dot(b, a) * (a_s * tl.load(s_ptrs + kk))[None, :]
                else:
                    bs = tl.load(s_ptrs + kk, mask=mn, other=0.0)
                    acc += tl.dot(b, a) * bs[:, None] * a_s[None, :]
            else:
                a = tl.load(a_ptrs + j * 128, mask=mm[:, None], other=0.0)
                b = tl.load(b_ptrs + j * 128, mask=mn[None, :], other=0.0)
                if BN <= 128:
                    acc += tl.dot(a, b) * (a_s * tl.load(s_ptrs + kk))[:, None]
                else:
                    bs = tl.load(s_ptrs + kk, mask=mn, other=0.0)
                    acc += tl.dot(a, b) * a_s[:, None] * bs[None, :]
        a_ptrs += 128 * KSUB
        b_ptrs += 128 * KSUB
    if SWAP:
        acc = tl.trans(acc)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mm[:, None] & mn[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        p_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs + (split * M).to(tl.int64) * N, acc, mask=mask)
        if last_to_arrive(cnt_ptr + pid, SPLIT):
            total = tl.zeros((BM, BN), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(p_ptrs + (s * M).to(tl.int64) * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)


# Tiles by M and shape, from scripts/dev/tune_fp8_linear.py on an H100 (2026-12-06, weights
# streamed from HBM, CUDA-graph timing) at Qwen3-30B-A3B's projections (qkv 2048 -> 5120, o
# 4096 -> 2048). Decode sizes stream the weight once: narrow N tiles so that enough programs run,
# and KSUB 128-deep blocks per iteration so that more loads are in flight per SM (o, K 4096: 8).
# x comes quantized (``x_fp8``, from the launch that produced it) or is quantized by a separate
# launch: quantizing inside the K loop measured 25-55% slower at every M (its row reductions sit
# in the loop's critical path; bench/results/tune-fp8-linear-h100-80gb-hbm3.json).
# calls of at most this many rows prefetch their weights into L2 (under PDL) before waiting for the
# previous kernel. 0 (off): PDL was faster without it (pdl.py); ab_decode_fusions' with_prefetch: 64
PREFETCH_MAX_M = 0


def pick_config(m: int, n: int, k: int) -> dict:
    """Tile config of one call: BM, BN, KSUB, num_warps, num_stages, and at decode sizes SWAP
    (transposed dots: wgmma for BM < 64) and TMA (bulk-copy weight tiles). From an H100 sweep at
    Qwen3-30B-A3B's qkv (wide: N 5120, K 2048) and o (N 2048, K 4096) projections
    (scripts/dev/tune_fp8_linear.py --swap, bench/results/tune-fp8-linear-swap-h100-80gb-hbm3.json):
    qkv M = 1 10.25 -> 9.11 us, 32 11.42 -> 9.56; o M = 1 11.28 -> 10.37, 32 12.13 -> 10.72, 64
    11.22 -> 10.90; no SWAP tile won for wide at 64 or at 256. Up to 16 rows, from the split-K
    sweep (``--split``, bench/results/tune-fp8-linear-split-h100-80gb-hbm3.json): qkv 8.65 -> 8.14
    us at M = 1 (TMA tiles, KSUB 2, no split); o, whose 2048 columns make too few tiles for 132
    SMs, 9.61 -> 7.78 (128-wide tiles, K split 8 ways): the FP8 step at batch 1 3.09 against
    3.15-3.18 ms (bench/results/ab-router-matmul-linear-split-h100-80gb-hbm3.json). The sweep's
    tiles at 32 rows (qkv 9.51 -> 8.78, o split 4 ways 9.91 -> 8.90 in isolation) made that step
    0.025 ms slower in both rounds: not taken."""
    wide = n >= 4096
    if m <= 16:
        cfg = (dict(BM=16, BN=64, KSUB=2, num_stages=4, SWAP=True, TMA=True) if wide
               else dict(BM=16, BN=128, KSUB=1, num_stages=4, SWAP=True, TMA=True, SPLIT=8))
    elif m <= 32:
        cfg = (dict(BM=32, BN=64, KSUB=2, num_stages=4, SWAP=True, TMA=True) if wide
               else dict(BM=16, BN=64, KSUB=4, num_stages=3, SWAP=True, TMA=True))
    elif m <= 64:
        cfg = (dict(BM=64, BN=64, KSUB=2, num_stages=4) if wide
               else dict(BM=16, BN=64, KSUB=4, num_stages=4, SWAP=True, TMA=True))
    elif m <= 128:
        cfg = dict(BM=64, BN=64 if wide else 32, KSUB=2, num_stages=3 if wide else 4)
    elif m <= 256:
        cfg = dict(BM=64, BN=128, KSUB=1, num_stages=3) if wide else dict(BM=64, BN=64, KSUB=2, num_stages=4)
    else:
        bm = 64 if m <= 2048 else 128
        return dict(BM=bm, BN=128, KSUB=1, num_warps=8 if bm == 128 else 4, num_stages=3)
    while (k // FP8_BLOCK) % cfg["KSUB"]:
        cfg["KSUB"] //= 2
    while (k // FP8_BLOCK) % (cfg["KSUB"] * cfg.get("SPLIT", 1)):  # other shapes than the tuned ones
        cfg["SPLIT"] //= 2
    return dict(cfg, num_warps=4)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               config: dict | None = None,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, weight_scale_inv [N/128, K/128]
    float32 -> [..., N] in x's dtype. K and N must be multiples of 128. ``config``: a tile config
    as :func:`pick_config` returns (for tuning scripts). ``x_fp8``: x already quantized per row
    and 128 columns (q [M, K] e4m3, scales [M, K/128] float32, e.g. from ``rms_norm_fused(...,
    fp8=True)``), used instead of quantizing x here."""
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
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    cfg = config or pick_config(m, n, k)
    pdl = pdl_args(x.device)
    split = cfg.get("SPLIT", 1)
    if (k // FP8_BLOCK) % (cfg["KSUB"] * split):
        raise ValueError(f"KSUB {cfg['KSUB']} x SPLIT {split} does not divide K/128 = {k // FP8_BLOCK}")
    if x_fp8 is not None:
        xq, xs = x_fp8
        if (xq.shape != (m, k) or xq.dtype != torch.float8_e4m3fn or xq.stride(-1) != 1
                or xs.shape != (m, k // FP8_BLOCK) or xs.dtype != torch.float32):
            raise ValueError(f"x_fp8 must be (float8_e4m3fn [{m}, {k}], float32 [{m}, {k // FP8_BLOCK}])")
    else:
        xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
        xs = torch.empty((m, k // FP8_BLOCK), dtype=torch.float32, device=x.device)
        g = 4
        _quant_act_kernel[(m, triton.cdiv(k // FP8_BLOCK, g))](
            x2, xq, xs, k, x2.stride(0), xq.stride(0), xs.stride(0), G=g,
            **pdl)
    ws = weight_scale_inv.contiguous()
    bm, bn = cfg["BM"], cfg["BN"]
    swap = cfg.get("SWAP", False)
    desc = _weight_desc(weight.unsqueeze(0), cfg, True, n, FP8_BLOCK)  # [1, N, K]: one "slot"
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, tiles)
    else:
        part = cnt = y  # not read
    _fp8_linear_kernel[(tiles * split,)](
        xq, xs, weight, desc, ws, y, part, cnt, m, n, k, xq.stride(0), xs.stride(0),
        weight.stride(0), ws.stride(0), y.stride(0),
        BM=bm, BN=bn, KSUB=cfg["KSUB"], GROUP_M=8, SPLIT=split, **pdl,
        PREFETCH=pdl["USE_PDL"] and m <= PREFETCH_MAX_M, SWAP=swap, TMA=desc is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, n)
