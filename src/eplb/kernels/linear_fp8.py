"""Block-FP8 dense linear (e.g. attention projections of an FP8 checkpoint kept in FP8).

y[M, N] = x[M, K] @ dequant(w)[N, K]^T with w float8_e4m3fn and ``weight_scale_inv`` [N/128, K/128]
per 128x128 block; x is quantized per row and 128-channel group on the fly (same scheme as the
MoE kernels), each 128-deep K step is an FP8 tensor-core dot scaled by activation x weight scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.moe_triton import FP8_BLOCK, _quant_act_kernel


@triton.jit(do_not_specialize=["M"])
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
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty((m, k // FP8_BLOCK), dtype=torch.float32, device=x.device)
    g = 4
    _quant_act_kernel[(m, triton.cdiv(k // FP8_BLOCK, g))](
        x2, xq, xs, k, x2.stride(0), xq.stride(0), xs.stride(0), G=g)
    ws = weight_scale_inv.contiguous()
    bm = 16 if m <= 16 else 64 if m <= 2048 else 128
    bn = 128
    if m <= 64:
        # decode sizes stream the weight once: at BN 128 the o projection (N 2048) ran 16 CTAs on
        # 132 SMs. Narrower tiles until there are >= 128 (still one 128-row scale block per tile)
        while bn > 16 and triton.cdiv(m, bm) * triton.cdiv(n, bn) < 128:
            bn //= 2
    warps = 8 if bm == 128 else 4
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_linear_kernel[grid](xq, xs, weight, ws, y, m, n, k, xq.stride(0), xs.stride(0),
                             weight.stride(0), ws.stride(0), y.stride(0),
                             BM=bm, BN=bn, GROUP_M=8, num_warps=warps, num_stages=3)
    return y.view(*lead, n)
