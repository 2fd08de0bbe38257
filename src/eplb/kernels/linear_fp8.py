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
from eplb.kernels.moe_triton import FP8_BLOCK, _quant_act_kernel

# K is summed in chunks of CHUNK_BLOCKS 128-deep blocks: the blocks of a chunk one after another
# into a chunk sum, the chunk sums then in chunk order. A launch either runs the whole K in each
# program (SPLIT 1) or gives each chunk its own program (SPLIT = the chunk count; the last program of
# an output tile to finish adds the chunk sums, in chunk order): the same float32 additions in the
# same order, so every config and every M gives the same bits (a row's result does not depend on
# the batch it is in).
CHUNK_BLOCKS = 4


@triton.jit(do_not_specialize=["M"])
def _fp8_linear_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K,
                       stride_xm, stride_xs, stride_wn, stride_sn, stride_ym,
                       BM: tl.constexpr, BN: tl.constexpr, KSUB: tl.constexpr, GROUP_M: tl.constexpr,
                       CHUNK: tl.constexpr, SPLIT: tl.constexpr):
    """KSUB 128-deep blocks per loop iteration: at decode sizes a program streams a narrow weight
    tile, and more independent loads in flight per SM is what reaches the read rate. SPLIT > 1:
    program (tile, c) sums chunk c only (more programs than SMs at decode sizes, where the tiles
    alone leave most SMs idle); the tile's last program to arrive adds the chunk sums."""
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
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    as_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xs
    if BN <= 128:  # the tile lies in one 128-row weight block: one scale per K block
        s_ptrs = ws_ptr + (pid_n * BN // 128) * stride_sn
    else:
        s_ptrs = ws_ptr + (offs_n // 128) * stride_sn
    n_chunks = K // (128 * CHUNK)
    if SPLIT == 1:
        c_lo = 0
        c_hi = n_chunks
    else:
        c_lo = tl.program_id(1)
        c_hi = c_lo + 1
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        part = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, CHUNK // KSUB):
            for j in tl.static_range(KSUB):
                kk = c * CHUNK + kb * KSUB + j
                a = tl.load(a_ptrs + kk * 128, mask=mm[:, None], other=0.0)
                b = tl.load(b_ptrs + kk * 128, mask=mn[None, :], other=0.0)
                a_s = tl.load(as_ptrs + kk, mask=mm, other=0.0)
                if BN <= 128:
                    part += tl.dot(a, b) * (a_s * tl.load(s_ptrs + kk))[:, None]
                else:
                    bs = tl.load(s_ptrs + kk, mask=mn, other=0.0)
                    part += tl.dot(a, b) * a_s[:, None] * bs[None, :]
        acc += part
    out_mask = mm[:, None] & mn[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        mn_off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + c_lo.to(tl.int64) * M * N + mn_off, acc, mask=out_mask)
        if last_to_arrive(cnt_ptr + pid, SPLIT):
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(0, SPLIT):
                tot += tl.load(part_ptr + s * M * N + mn_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=out_mask)


# Tiles by M and shape, from scripts/dev/tune_fp8_linear.py on an H100 (2026-12-06, weights
# streamed from HBM, CUDA-graph timing) at Qwen3-30B-A3B's projections (qkv 2048 -> 5120, o
# 4096 -> 2048). Decode sizes stream the weight once: narrow N tiles so that enough programs run,
# and KSUB 128-deep blocks per iteration so that more loads are in flight per SM (o, K 4096: 8).
# x comes quantized (``x_fp8``, from the launch that produced it) or is quantized by a separate
# launch: quantizing inside the K loop measured 25-55% slower at every M (its row reductions sit
# in the loop's critical path; bench/results/tune-fp8-linear-h100-80gb-hbm3.json).
# SPLIT (one program per K chunk) where the output tiles alone are fewer than _SPLIT_BELOW programs:
# at M <= 32 the tiles of qkv and o were 80 and 64 programs on 132 SMs. The tile's last program to
# finish adds the chunk sums (eplb.kernels.arrival).
_SPLIT_BELOW = 264
_SPLIT_MAX_M = 64  # the chunk sums go through L2: M x N x 4 bytes per chunk


def chunk_blocks(k: int) -> int:
    """128-deep blocks per K chunk for a K: CHUNK_BLOCKS, or the largest power of two below it
    that divides K / 128. A function of K alone (the numerics depend on it)."""
    c = CHUNK_BLOCKS
    while (k // FP8_BLOCK) % c:
        c //= 2
    return c


def pick_config(m: int, n: int, k: int) -> dict:
    """Tile config of one call: BM, BN, KSUB, SPLIT, num_warps, num_stages."""
    wide = n >= 4096
    if m <= 32:
        cfg = dict(BM=16, BN=64 if wide else 32, KSUB=2, num_stages=4 if wide else 3)
    elif m <= 64:
        cfg = dict(BM=64, BN=64 if wide else 16, KSUB=2, num_stages=4)
    elif m <= 128:
        cfg = dict(BM=64, BN=64 if wide else 32, KSUB=2, num_stages=3 if wide else 4)
    elif m <= 256:
        cfg = dict(BM=64, BN=128, KSUB=1, num_stages=3) if wide else dict(BM=64, BN=64, KSUB=2, num_stages=4)
    else:
        bm = 64 if m <= 2048 else 128
        return dict(BM=bm, BN=128, KSUB=1, SPLIT=1, num_warps=8 if bm == 128 else 4, num_stages=3)
    chunk = chunk_blocks(k)
    cfg["KSUB"] = min(cfg["KSUB"], chunk)
    chunks = k // (FP8_BLOCK * chunk)
    tiles = -(-m // cfg["BM"]) * -(-n // cfg["BN"])
    cfg["SPLIT"] = chunks if m <= _SPLIT_MAX_M and tiles < _SPLIT_BELOW and chunks > 1 else 1
    return dict(cfg, num_warps=4)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
               config: dict | None = None,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), weight [N, K] float8_e4m3fn, weight_scale_inv [N/128, K/128]
    float32 -> [..., N] in x's dtype. K and N must be multiples of 128. ``config``: a tile config
    as :func:`pick_config` returns (for tuning scripts). ``x_fp8``: x already quantized per row
    and 128 columns (q [M, K] e4m3, scales [M, K/128] float32, e.g. from ``rms_norm_fused(...,
    fp8=True)``), used instead of quantizing x here. The result's bits do not depend on the config
    or on the other rows of x."""
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
    chunk = chunk_blocks(k)
    chunks = k // (FP8_BLOCK * chunk)
    if chunk % cfg["KSUB"]:
        raise ValueError(f"KSUB {cfg['KSUB']} does not divide the K chunk of {chunk} blocks")
    split = cfg.get("SPLIT", 1)
    if split not in (1, chunks):
        raise ValueError(f"SPLIT must be 1 or the K chunk count {chunks}, got {split}")
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
            x2, xq, xs, k, x2.stride(0), xq.stride(0), xs.stride(0), G=g)
    ws = weight_scale_inv.contiguous()
    bm, bn = cfg["BM"], cfg["BN"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, tiles)
    else:
        part, cnt = y, y  # dummy pointers
    _fp8_linear_kernel[(tiles, split)](xq, xs, weight, ws, y, part, cnt, m, n, k, xq.stride(0), xs.stride(0),
                                       weight.stride(0), ws.stride(0), y.stride(0),
                                       BM=bm, BN=bn, KSUB=cfg["KSUB"], GROUP_M=8, CHUNK=chunk, SPLIT=split,
                                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, n)
