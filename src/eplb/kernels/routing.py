"""Fused router tail: softmax over experts, top-k, optional renormalisation, in one launch.

Replaces torch's softmax + topk + sum + divide (4-5 launches; ~0.25 ms at 8192 tokens on an H100)
after the router matmul, which stays in cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T"])
def _softmax_topk_kernel(logit_ptr, w_ptr, id_ptr, T, E, stride_l,
                         K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BR: tl.constexpr, RENORM: tl.constexpr):
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
        v = tl.max(p, axis=1)
        idx = tl.argmax(p, axis=1)
        wk = tl.where(kc[None, :] == j, v[:, None], wk)
        ik = tl.where(kc[None, :] == j, idx[:, None].to(tl.int64), ik)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    if RENORM:
        wk = wk / tl.sum(wk, axis=1)[:, None]
    om = rm[:, None] & (kc[None, :] < K)
    off = rows[:, None].to(tl.int64) * K + kc[None, :]
    tl.store(w_ptr + off, wk, mask=om)
    tl.store(id_ptr + off, ik, mask=om)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, descending; ids [T, k] int64), the top-k of
    softmax(logits) in float32, divided by their sum when ``renormalize``."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {list(logits.shape)}")
    t, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"k must be in [1, {e}], got {k}")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    w = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t == 0:
        return w, ids
    e_pad = triton.next_power_of_2(e)
    br = max(1, min(16, 4096 // e_pad))
    _softmax_topk_kernel[(triton.cdiv(t, br),)](
        logits, w, ids, t, e, logits.stride(0), K=k, K_PAD=triton.next_power_of_2(k),
        E_PAD=e_pad, BR=br, RENORM=renormalize, num_warps=4)
    return w, ids
