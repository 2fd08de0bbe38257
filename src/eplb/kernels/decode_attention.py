"""Decode attention over the slotted KV cache: flash-decoding split-K in Triton, graph-capturable.

KV cache of one layer: ``k_cache, v_cache [S, Hkv, L, D]``; decode row ``b`` reads slot ``slots[b]``,
keys ``0 .. ctx_lens[b]-1``. Two launches:

1. ``_split_kernel``, grid ``(B, Hkv, num_splits)``: one program takes one kv head of one row and one
   range of keys, for all ``G = Hq / Hkv`` query heads at once (one ``tl.dot`` with G padded to 16
   rows), so K/V are read once per kv head. The grid is fixed by the shapes; the key ranges are cut
   in the kernel from the row's ctx_len (``num_splits`` near-equal ranges of whole key blocks), so a
   short context does not leave most of a large grid idle. Each program writes its normalised
   partial output and the log2-sum-exp of its scores; an empty range reads nothing, lse = -inf.
2. ``_combine_kernel``, grid ``(B, Hq)``: the online-softmax merge of the splits. Skipped when
   ``num_splits == 1`` (large batches): the split kernel then writes the output itself; and up to
   ``_MERGE_MAX_SPLITS`` splits, where the last split program of a (row, kv head) to finish merges
   them (the same ``_merge_splits``, for all G heads at once).
Whichever launch writes the output can also write it quantized for a block-FP8 o projection
(``fp8_out``), so that GEMM needs no quantization launch of its own.

Nothing on the host depends on ``ctx_lens`` values and nothing is read back, so a captured CUDA
graph can be replayed with new ``ctx_lens``/``slots``/``q`` contents.
The plain torch path with the same arguments is ``eplb.model.attention.decode_attention_torch``
(CPU, and the reference of the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.arrival import arrival_counters, last_to_arrive
from eplb.kernels.moe_triton import _quant_rows
from eplb.kernels.pdl import pdl_args, pdl_wait

_LOG2E = 1.4426950408889634
# num_splits: enough (row, kv head, split) programs to fill the GPU (~_TARGET_PROGRAMS; B*Hkv alone
# does at large B), at most _MAX_SPLITS (the combine kernel merges them in one tile) and at most one
# per key block of max_len. Chosen on an H100 with scripts/dev/bench_decode_attention.py --sweep:
# 512 beat 1024..8192 at every measured (B, ctx) (Qwen3 shape: B=1 -> 128 splits, B=32 -> 4,
# B>=128 -> 1, i.e. no combine launch); block 64 / 4 warps / 2 stages were as good as any.
_TARGET_PROGRAMS = 512
_MAX_SPLITS = 128
# Up to this many splits the split kernel merges them itself: the last program of a (row, kv head)
# to finish reads the G heads' partials back (one [G, splits, D] tile) and writes the output, so
# there is no combine launch (eplb.kernels.arrival). More splits (small batches) keep _combine_kernel.
_MERGE_MAX_SPLITS = 4


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, ctx_ptr, o_ptr, lse_ptr,
    L, G, HQ, NS, qk_scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh, stride_kl,
    stride_vs, stride_vh, stride_vl,
    stride_ob, stride_oh, q8_ptr, qs_ptr, stride_q8, stride_qs, out_ptr, cnt_ptr,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr, FP8: tl.constexpr, MERGE: tl.constexpr, NS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    ctx = tl.maximum(tl.minimum(tl.load(ctx_ptr + b).to(tl.int32), L), 0)  # never read past the cache
    # this row's keys in NS ranges of whole blocks; ctx 0 -> every range empty
    per = tl.cdiv(tl.cdiv(ctx, NS), BLOCK_N) * BLOCK_N
    start = sp * per
    end = tl.minimum(start + per, ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gm = g < G
    heads = kvh * G + g
    active = (start + 0 * g) < end  # as a [G_PAD] vector: triton's interpreter rejects scalar-bool masks
    # padded heads (g >= G) get q = 0: finite scores, results never stored
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(gm & active)[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    k_base = k_ptr + slot * stride_ks + kvh * stride_kh
    v_base = v_ptr + slot * stride_vs + kvh * stride_vh

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    # runtime bounds: an empty range runs zero iterations
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        k = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every block has >= 1 valid key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vl + d[None, :], mask=nm[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    has = l > 0
    l_safe = tl.where(has, l, 1.0)
    o = acc / l_safe[:, None]  # 0 where nothing was attended
    if DIRECT:  # the only split: this is the output (zeros for ctx_len 0)
        ob = o.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :], ob,
                 mask=gm[:, None])
        if FP8:
            _store_fp8(ob, q8_ptr + b.to(tl.int64) * stride_q8 + heads[:, None] * D + d[None, :],
                       qs_ptr + b.to(tl.int64) * stride_qs + heads, gm[:, None], gm)
    else:
        row = (b * HQ + heads).to(tl.int64) * NS + sp
        tl.store(lse_ptr + row, tl.where(has, m + tl.log2(l_safe), float("-inf")), mask=gm)
        tl.store(o_ptr + row[:, None] * D + d[None, :], o, mask=(gm & active)[:, None])
        if MERGE:  # noqa: SIM102 (a constexpr branch: no atomic at all without MERGE)
            # few splits: the last of this (row, kv head)'s programs to finish merges them
            if last_to_arrive(cnt_ptr + b * (HQ // G) + kvh, NS):
                _merge_splits(o_ptr, lse_ptr, out_ptr, b, kvh * G, G, NS, HQ, stride_ob, stride_oh, q8_ptr,
                              qs_ptr, stride_q8, stride_qs, D, G_PAD, NS_PAD, FP8, ".cg")


@triton.jit
def _merge_splits(o_ptr, lse_ptr, out_ptr, b, h0, NH, NS, HQ, stride_ob, stride_oh, q8_ptr, qs_ptr,
                  stride_q8, stride_qs, D: tl.constexpr, H_PAD: tl.constexpr, NS_PAD: tl.constexpr,
                  FP8: tl.constexpr, CACHE: tl.constexpr):
    """Heads h0 .. h0 + NH - 1 of row b: the online-softmax merge of their NS split partials
    (o [B, HQ, NS, D] float32 normalised per split, lse [B, HQ, NS] log2-sum-exp, -inf for an
    empty split, whose o is not read) -> out (and its FP8 form)."""
    hh = tl.arange(0, H_PAD)
    hm = hh < NH
    heads = h0 + hh
    s = tl.arange(0, NS_PAD)
    d = tl.arange(0, D)
    row = (b * HQ + heads).to(tl.int64) * NS
    lse = tl.load(lse_ptr + row[:, None] + s[None, :], mask=hm[:, None] & (s < NS)[None, :],
                  other=float("-inf"), cache_modifier=CACHE)
    mx = tl.max(lse, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # ctx_len 0: all weights 0 -> output 0, not NaN
    w = tl.exp2(lse - mx[:, None])
    live = lse > float("-inf")  # empty splits wrote no partial output: do not read it
    o = tl.load(o_ptr + (row[:, None, None] + s[None, :, None]) * D + d[None, None, :],
                mask=live[:, :, None], other=0.0, cache_modifier=CACHE)
    tot = tl.sum(w, 1)
    out = tl.sum(w[:, :, None] * o, 1) / tl.where(tot > 0, tot, 1.0)[:, None]
    ob = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :], ob, mask=hm[:, None])
    if FP8:
        _store_fp8(ob, q8_ptr + b.to(tl.int64) * stride_q8 + heads[:, None] * D + d[None, :],
                   qs_ptr + b.to(tl.int64) * stride_qs + heads, hm[:, None], hm)


@triton.jit
def _store_fp8(ob, q_ptrs, s_ptrs, mask, smask):
    """Rows of ``ob`` (output dtype; one head of D = 128 each) quantized for a block-FP8 GEMM:
    e4m3 and one float32 scale per row (moe_triton._quant_rows)."""
    q, sc = _quant_rows(ob)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(s_ptrs, sc, mask=smask)


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, out_ptr, NS, HQ, stride_ob, stride_oh, q8_ptr, qs_ptr, stride_q8,
                    stride_qs, D: tl.constexpr, NS_PAD: tl.constexpr, FP8: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """Grid (B, HQ): the merge of one head's splits, for split counts too large for one tile per
    kv head (see _MERGE_MAX_SPLITS)."""
    pdl_wait(USE_PDL)
    _merge_splits(o_ptr, lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), 1, NS, HQ, stride_ob, stride_oh,
                  q8_ptr, qs_ptr, stride_q8, stride_qs, D, 1, NS_PAD, FP8, "")


def split_plan(batch: int, kv_heads: int, max_len: int, block_n: int = 64,
               target_programs: int = _TARGET_PROGRAMS) -> int:
    """Number of key splits per (row, kv head) for a shape: a function of shapes only."""
    return max(1, min(_MAX_SPLITS, triton.cdiv(max_len, block_n), target_programs // max(1, batch * kv_heads)))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
           ctx_lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [S, Hkv, L, D]; got {list(q.shape)}, {list(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {list(v_cache.shape)} != k_cache shape {list(k_cache.shape)}")
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has {d}, cache has {k_cache.shape[3]}")
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if slots.shape != (b,) or ctx_lens.shape != (b,):
        raise ValueError(f"slots and ctx_lens must be [B={b}]; got {list(slots.shape)}, {list(ctx_lens.shape)}")


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    ctx_lens: torch.Tensor, scale: float, fp8_out: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """q [B, Hq, D]; k_cache/v_cache [S, Hkv, L, D]; slots [B] int (cache slot of each row);
    ctx_lens [B] int32/int64 (keys 0..ctx_len-1 of that slot are attended, current token included).
    -> out [B, Hq, D] in q's dtype. GQA: q head h uses kv head h // (Hq // Hkv).

    No host synchronisation; the launch grid depends on (B, Hkv, L) only, so it can be captured in a
    CUDA graph and replayed with other ``ctx_lens``. Rows with ctx_len 0 give zeros. ctx_lens above L
    are clamped to L. D must be a power of two >= 16.

    ``fp8_out`` (D == 128): returns (out, (q8 [B, Hq * D] float8_e4m3fn, scales [B, Hq] float32)),
    the output also quantized per row and head (= 128 columns) for the block-FP8 o projection,
    written by the same launch that writes ``out``.
    """
    return _decode_attention(q, k_cache, v_cache, slots, ctx_lens, scale, fp8_out=fp8_out)


def _decode_attention(q, k_cache, v_cache, slots, ctx_lens, scale, *, block_n: int = 64, num_warps: int = 4,
                      num_stages: int = 2, target_programs: int = _TARGET_PROGRAMS, fp8_out: bool = False):
    # the knobs are for tests and scripts/dev/bench_decode_attention.py; callers use decode_attention
    _check(q, k_cache, v_cache, slots, ctx_lens)
    b, hq, d = q.shape
    _, hkv, max_len, _ = k_cache.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"decode_attention needs a power-of-two head_dim >= 16, got {d}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous head_dim (stride(-1) == 1)")
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if fp8_out:
        if d != 128:
            raise ValueError(f"fp8_out needs head_dim 128 (one quantization group per head), got {d}")
        q8 = torch.empty((b, hq * d), dtype=torch.float8_e4m3fn, device=q.device)
        qs = torch.empty((b, hq), dtype=torch.float32, device=q.device)
        fp8_args = (q8, qs, q8.stride(0), qs.stride(0))
    else:
        fp8_args = (out, out, 0, 0)  # dummy pointers
    if b == 0:
        return (out, fp8_args[:2]) if fp8_out else out
    if q.stride(-1) != 1:
        q = q.contiguous()
    slots, ctx_lens = slots.contiguous(), ctx_lens.contiguous()  # read as flat arrays (no-op if already)
    g = hq // hkv
    ns = split_plan(b, hkv, max_len, block_n, target_programs)
    merge = 1 < ns <= _MERGE_MAX_SPLITS
    if ns == 1:
        o_part = lse = out
    else:
        o_part = torch.empty((b, hq, ns, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, ns), dtype=torch.float32, device=q.device)
    cnt = arrival_counters(q.device, b * hkv) if merge else out
    pdl = pdl_args(q.device)
    _split_kernel[(b, hkv, ns)](
        q, k_cache, v_cache, slots, ctx_lens, o_part, lse,
        max_len, g, hq, ns, float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), *fp8_args, out, cnt,
        D=d, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
        IEEE=k_cache.dtype == torch.float32, DIRECT=ns == 1, FP8=fp8_out and (ns == 1 or merge),
        MERGE=merge, NS_PAD=max(2, triton.next_power_of_2(ns)), **pdl,
        num_warps=num_warps, num_stages=num_stages,
    )
    if ns > 1 and not merge:
        _combine_kernel[(b, hq)](
            o_part, lse, out, ns, hq, out.stride(0), out.stride(1), *fp8_args,
            D=d, NS_PAD=max(2, triton.next_power_of_2(ns)), FP8=fp8_out, **pdl, num_warps=4,
        )
    return (out, fp8_args[:2]) if fp8_out else out


