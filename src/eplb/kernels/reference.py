"""Plain torch MoE over local slots: the CPU path and the reference the Triton kernels are tested
against. Same arguments and layout as :mod:`eplb.kernels.moe_triton` (w13 [S, 2I, H] gate rows then
up rows, w2 [S, H, I]); also the block-FP8 helpers used to build and check FP8 weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_BLOCK = 128
FP8_MAX = 448.0


def moe_pairs_torch(x: torch.Tensor, topk_slot: torch.Tensor, topk_weight: torch.Tensor | None,
                    w13: torch.Tensor, w2: torch.Tensor,
                    act_quant: bool = False) -> torch.Tensor:
    """x [T, H], topk_slot [T, k] (-1 = not local), w13 [S, 2I, H], w2 [S, H, I] (already
    dequantized) -> per-pair outputs [T, k, H] (times topk_weight when given; zero where -1).

    Grouped by slot: one gather and two matmuls per slot that has pairs. ``act_quant`` emulates the
    FP8 kernel's on-the-fly activation quantization (per row and 128-channel group, e4m3) before
    each matmul, so the FP8 kernel can be checked against the same function it computes."""
    t, k = topk_slot.shape
    h = x.shape[1]
    i = w13.shape[1] // 2
    flat = topk_slot.reshape(-1)
    out = torch.zeros((t * k, h), dtype=x.dtype, device=x.device)
    order = torch.argsort(flat, stable=True)
    sorted_slots = flat[order]
    valid = sorted_slots >= 0
    order, sorted_slots = order[valid], sorted_slots[valid]
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    start = 0
    for s, c in zip(slots.tolist(), counts.tolist()):
        pairs = order[start:start + c]
        start += c
        xs = x[pairs // k]
        if act_quant:
            xs = quant_dequant_act(xs)
        gu = F.linear(xs, w13[s])
        hs = F.silu(gu[:, :i]) * gu[:, i:]
        if act_quant:
            hs = quant_dequant_act(hs)
        ys = F.linear(hs, w2[s])
        if topk_weight is not None:
            ys = ys * topk_weight.reshape(-1)[pairs, None].to(ys.dtype)
        out[pairs] = ys.to(out.dtype)
    return out.view(t, k, h)


def moe_torch(x: torch.Tensor, topk_slot: torch.Tensor, topk_weight: torch.Tensor,
              w13: torch.Tensor, w2: torch.Tensor, act_quant: bool = False) -> torch.Tensor:
    """Weighted sum over k of :func:`moe_pairs_torch` -> [T, H] (summed in float32)."""
    y = moe_pairs_torch(x, topk_slot, topk_weight, w13, w2, act_quant)
    return y.float().sum(1).to(x.dtype)


def quant_dequant_act(a: torch.Tensor) -> torch.Tensor:
    """Round a [N, K] activation through e4m3 with one scale per row and 128-channel group
    (scale = amax / 448), as the FP8 kernel does, and return it dequantized in float32."""
    n, kdim = a.shape
    g = a.float().view(n, kdim // FP8_BLOCK, FP8_BLOCK)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (g / s).to(torch.float8_e4m3fn)
    return (q.float() * s).view(n, kdim)


def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] (O, I multiples of 128) -> (float8_e4m3fn [..., O, I], weight_scale_inv
    float32 [..., O/128, I/128]) with w ~= q * scale per 128x128 block (scale = block amax / 448)."""
    *lead, o, i = w.shape
    if o % FP8_BLOCK or i % FP8_BLOCK:
        raise ValueError(f"block-FP8 needs both dims divisible by {FP8_BLOCK}, got {o}x{i}")
    b = w.float().reshape(*lead, o // FP8_BLOCK, FP8_BLOCK, i // FP8_BLOCK, FP8_BLOCK)
    s = b.abs().amax(dim=(-3, -1), keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (b / s).to(torch.float8_e4m3fn).reshape(*lead, o, i)
    return q, s.reshape(*lead, o // FP8_BLOCK, i // FP8_BLOCK).contiguous()

