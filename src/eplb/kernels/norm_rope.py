"""Fused elementwise kernels of a decoder layer: residual add + RMSNorm, and q/k head norm + RoPE.

Both reproduce the rounding steps of the torch path in ``eplb.model.transformer`` (bf16/fp16):

* ``rms_norm_fused``: ``r = x + residual`` rounded to the dtype (the torch add); then float32
  RMSNorm of ``r``, cast to the dtype, times the weight in float32, rounded (torch's bf16 * bf16).
* ``qk_norm_rope``: per-head RMSNorm of q and k (Qwen3's "head" qk_norm, optional), then
  rotate-half RoPE ``x * cos + rot(x) * sin`` with cos/sin cast to the dtype and a rounding to the
  dtype after each of the three ops, as torch does.

The float32 sum of squares is accumulated in the order of torch's CUDA RMSNorm kernel
(``vectorized_layer_norm_kernel`` with rms_norm=true, reached by ``F.rms_norm``): per thread of a
128-thread block, an FMA chain over its 4-element vectors (thread t reads vectors t, t + 128, ...),
then a shuffle-down tree within each warp (offsets 16..1), then a tree over the 4 warps (offsets
2, 1), divided by H, ``rsqrt(ms + eps)``. With that order the result is bit-identical to torch;
``_TORCH_THREADS`` is that kernel's block size (128; with 256, 144 of 16.7M outputs differ on an
H100). Whether ``s + v * v`` is an FMA does not matter for bf16/fp16 data (v * v is exact in
float32). ``EXACT=False`` uses a plain ``tl.sum``: ~90 of 16.7M bf16 outputs then differ by an ulp.

Both kernels are compiled with ``enable_fp_fusion=False``: otherwise LLVM may contract the
RoPE's rounded ``x * cos`` and the add into one FMA (skipping torch's rounding of the product; on
an H100 that changed ~20% of the bf16 outputs by an ulp). The sum of squares uses explicit FMAs.

All launches take their grid from shapes only (no host syncs): CUDA-graph capturable.

H100, Qwen3-30B-A3B shapes, 8192 tokens, bf16 (scripts/dev/bench_norm_rope.py): add + rms_norm
229 -> ~64 us, q/k norm + RoPE ~1005 -> ~70-85 us; 0 differing elements against the torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eplb.kernels.moe_triton import _quant_rows
from eplb.kernels.pdl import pdl_args, pdl_wait

_TORCH_THREADS = 128  # at::native num_threads() on CUDA: warp size * 4
_TORCH_FMA = True  # nvcc contracts ``sigma2 + val * val`` to an FMA (same sums for bf16/fp16)
EXACT = True  # reproduce torch's reduction order (see module docstring)
# num_warps of the two kernels (None: from the tile size); the bench overrides them
NUM_WARPS_RMS: int | None = None
NUM_WARPS_QK: int | None = None
QK_HEADS_PER_PROGRAM: int | None = None  # None: the largest of 16, 8, 4, 2, 1 dividing Hq + Hkv

@triton.jit
def _chain4(acc, v4, FMA: tl.constexpr):
    """acc [...] += the squares of v4 [..., 2, 2] (element e = 2 * p + q), one after another in e."""
    a, b = tl.split(v4)  # q = 0: e0, e2; q = 1: e1, e3
    e0, e2 = tl.split(a)
    e1, e3 = tl.split(b)
    if FMA:
        acc = tl.fma(e0, e0, acc)
        acc = tl.fma(e1, e1, acc)
        acc = tl.fma(e2, e2, acc)
        acc = tl.fma(e3, e3, acc)
    else:
        acc = acc + e0 * e0
        acc = acc + e1 * e1
        acc = acc + e2 * e2
        acc = acc + e3 * e3
    return acc


@triton.jit
def _tree(acc, R: tl.constexpr, LANES: tl.constexpr):
    """acc [R, LANES] per-thread partial sums -> [R]: torch's warp shuffle-down tree (lane l takes
    l + 16, then + 8, ... + 1), then the tree over warps (warp w takes w + 2, then w + 1). Each step
    adds exactly two values, so the order of a size-2 ``tl.sum`` cannot matter. Lanes past the data
    hold exact zeros, as torch's idle threads do, so LANES may be any power of two in [32, 128]."""
    W: tl.constexpr = LANES // 32
    s = tl.sum(tl.reshape(acc, [R, W, 2, 16]), axis=2)
    s = tl.sum(tl.reshape(s, [R, W, 2, 8]), axis=2)
    s = tl.sum(tl.reshape(s, [R, W, 2, 4]), axis=2)
    s = tl.sum(tl.reshape(s, [R, W, 2, 2]), axis=2)
    s = tl.sum(tl.reshape(s, [R, W, 2, 1]), axis=2)
    s = tl.reshape(s, [R, W])
    if W == 4:
        s = tl.sum(tl.reshape(s, [R, 2, 2]), axis=1)  # warp w += warp w + 2
    return tl.sum(s, axis=1)


@triton.jit(do_not_specialize=["T"])
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, T, H, sx, sres, sout, srout, eps,
                     q_ptr, qs_ptr, sq, sqs,
                     BR: tl.constexpr, LANES: tl.constexpr, ITERS: tl.constexpr,
                     HAS_RES: tl.constexpr, EXACT: tl.constexpr, FMA: tl.constexpr,
                     FP8: tl.constexpr, USE_PDL: tl.constexpr):
    """BR rows per program; row chunk j covers columns [j * 4 * LANES, (j + 1) * 4 * LANES).
    FP8: the output is also written quantized for a block-FP8 GEMM (e4m3 q and a float32 scale
    per row and 128 columns: moe_triton._quant_rows)."""
    pdl_wait(USE_PDL)
    DP: tl.constexpr = 4 * LANES
    NG: tl.constexpr = DP // 128  # FP8 groups of 128 columns per chunk
    dt = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = rows < T
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, DP)
    acc = tl.zeros([BR, LANES], dtype=tl.float32)
    accp = tl.zeros([BR], dtype=tl.float32)
    for j in tl.static_range(ITERS):
        c = j * DP + cols
        m = rm[:, None] & (c < H)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * sx + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + rows64[:, None] * sres + c[None, :], mask=m, other=0.0).to(tl.float32)
            x = (x + r).to(dt)  # the torch add rounds the sum to the dtype
            tl.store(rout_ptr + rows64[:, None] * srout + c[None, :], x, mask=m)
            x = x.to(tl.float32)
        if EXACT:
            acc = _chain4(acc, tl.reshape(x, [BR, LANES, 2, 2]), FMA)
        else:
            accp += tl.sum(x * x, axis=1)
    if EXACT:
        ss = _tree(acc, BR, LANES)
    else:
        ss = accp
    rstd = tl.math.rsqrt(ss / H + eps)
    # second pass: re-read (L1/L2-hot) and recompute the sum rather than read back what this
    # program just stored, which other threads of the block wrote
    for j in tl.static_range(ITERS):
        c = j * DP + cols
        cm = c < H
        m = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + rows64[:, None] * sx + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + rows64[:, None] * sres + c[None, :], mask=m, other=0.0).to(tl.float32)
            x = (x + r).to(dt).to(tl.float32)
        # the weight as a [1, N] row: it then takes the rows' layout (a 1-D load is converted
        # through shared memory, a barrier per chunk)
        w = tl.load(w_ptr + c[None, :], mask=cm[None, :], other=0.0).to(tl.float32)
        y = (x * rstd[:, None]).to(dt).to(tl.float32)
        o = (y * w).to(dt)
        tl.store(out_ptr + rows64[:, None] * sout + c[None, :], o, mask=m)
        if FP8:  # one row of _quant_rows per 128 columns
            q, sc = _quant_rows(tl.reshape(o, [BR * NG, 128]))
            tl.store(q_ptr + rows64[:, None] * sq + c[None, :], tl.reshape(q, [BR, DP]), mask=m)
            gi = j * NG + tl.arange(0, NG)
            tl.store(qs_ptr + rows64[:, None] * sqs + gi[None, :], tl.reshape(sc, [BR, NG]),
                     mask=rm[:, None] & (gi < H // 128)[None, :])


def _warps(elems: int) -> int:
    """num_warps for a program over ``elems`` elements: ~16 per thread. H100, 8192 tokens, bf16
    (scripts/dev/bench_norm_rope.py): add+rms_norm H=2048 best at 4 warps (64 us vs 70-72 at
    1/2/8); q/k norm+RoPE with 4 heads x 128 best at 1 warp (69 us vs 75 / 87 / 157 at 2/4/8).
    A power of two, as triton requires on CUDA (its CPU interpreter does not check: 3 warps for
    H = 384 failed only on an H100)."""
    n = max(1, min(8, elems // 512))
    return 1 << (n.bit_length() - 1)


def _lanes(h: int) -> tuple[int, int]:
    """(lanes, iters): threads of torch's block that hold data for a row of h, and vectors each."""
    nvec = h // 4
    if nvec >= _TORCH_THREADS:
        return _TORCH_THREADS, triton.cdiv(nvec, _TORCH_THREADS)
    return max(32, triton.next_power_of_2(nvec)), 1


def rms_norm_fused(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None, fp8: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """x [N, H] (bf16/fp16, last dim contiguous), weight [H] -> out [N, H]; with ``residual``
    [N, H]: (out, r) where r = x + residual (rounded to x.dtype) and out = rms_norm(r) * weight.
    Numerics: those of ``weight * F.rms_norm(r.float(), (H,), eps=eps).to(dtype)``. H % 4 == 0.

    ``fp8``: also (q [N, H] float8_e4m3fn, scales [N, H/128] float32), ``out`` quantized per row
    and 128 columns for a block-FP8 GEMM (H % 128 == 0), as one more element of the result:
    (out, q, scales) or (out, r, q, scales). Saves the GEMM's own quantization launch."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [N, H] with a contiguous last dim, got {list(x.shape)} / {x.stride()}")
    t, h = x.shape
    if h % 4:
        raise ValueError(f"H must be a multiple of 4 (torch's vectorized RMSNorm), got {h}")
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    rout = None
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype:
            raise ValueError("residual must match x in shape and dtype with a contiguous last dim")
        rout = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if fp8:
        if h % 128:
            raise ValueError(f"fp8 output needs H divisible by 128, got {h}")
        q = torch.empty((t, h), dtype=torch.float8_e4m3fn, device=x.device)
        qs = torch.empty((t, h // 128), dtype=torch.float32, device=x.device)
    else:
        q = qs = out  # dummy pointers
    if t:
        lanes, iters = _lanes(h)
        br = max(1, min(16, 2048 // (4 * lanes * iters)))
        res = residual if residual is not None else x
        ro = rout if rout is not None else out
        _rms_norm_kernel[(triton.cdiv(t, br),)](
            x, res, weight, out, ro, t, h, x.stride(0), res.stride(0), out.stride(0), ro.stride(0),
            eps, q, qs, q.stride(0), qs.stride(0), BR=br, LANES=lanes, ITERS=iters,
            HAS_RES=residual is not None, EXACT=EXACT, FMA=_TORCH_FMA, FP8=fp8, **pdl_args(x.device),
            num_warps=NUM_WARPS_RMS or _warps(br * h), enable_fp_fusion=False)
    res = (out,) if residual is None else (out, rout)
    if fp8:
        res += (q, qs)
    return res[0] if len(res) == 1 else res


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr,
                         HQ, NH, D, s_qkv, s_cs, s_out, eps,
                         kc_ptr, vc_ptr, slot_ptr, kvpos_ptr, s_cslot, s_chead, s_cpos,
                         BH: tl.constexpr, LANES: tl.constexpr, HAS_NORM: tl.constexpr,
                         HAS_POS: tl.constexpr, EXACT: tl.constexpr, FMA: tl.constexpr,
                         WRITE_KV: tl.constexpr, USE_PDL: tl.constexpr):
    """One token x BH heads (of the HQ + HKV q/k heads) per program; tiles [BH, 4 * LANES >= D].
    WRITE_KV: the k heads' results and the matching v heads also go to the KV cache at
    [slot, head, position] (caches [S, HKV, L, D], strides s_cslot, s_chead, s_cpos)."""
    pdl_wait(USE_PDL)
    DP: tl.constexpr = 4 * LANES
    dt = out_ptr.dtype.element_ty
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = tl.arange(0, DP)
    half = D // 2
    cm = cols < D
    m = (heads < NH)[:, None] & cm[None, :]
    rc = tl.where(cols < half, cols + half, cols - half)  # rotate-half partner column
    base = qkv_ptr + tok * s_qkv + heads[:, None] * D
    x = tl.load(base + cols[None, :], mask=m, other=0.0)
    xr = tl.load(base + rc[None, :], mask=m, other=0.0)
    if HAS_NORM:
        xf = x.to(tl.float32)
        if EXACT:
            ss = _tree(_chain4(tl.zeros([BH, LANES], dtype=tl.float32),
                               tl.reshape(xf, [BH, LANES, 2, 2]), FMA), BH, LANES)
        else:
            ss = tl.sum(xf * xf, axis=1)
        rstd = tl.math.rsqrt(ss / D + eps)[:, None]
        is_q = (heads < HQ)[:, None]
        w = tl.where(is_q, tl.load(qw_ptr + cols, mask=cm, other=0.0)[None, :],
                     tl.load(kw_ptr + cols, mask=cm, other=0.0)[None, :]).to(tl.float32)
        wr = tl.where(is_q, tl.load(qw_ptr + rc, mask=cm, other=0.0)[None, :],
                      tl.load(kw_ptr + rc, mask=cm, other=0.0)[None, :]).to(tl.float32)
        # norm in float32 -> cast -> * weight (rounded), as rms_norm(x, w) in the torch path
        x = ((xf * rstd).to(dt).to(tl.float32) * w).to(dt)
        xr = ((xr.to(tl.float32) * rstd).to(dt).to(tl.float32) * wr).to(dt)
    rot = tl.where(cols < half, -xr, xr).to(tl.float32)  # cat([-x2, x1]); negation is exact
    if HAS_POS:
        p = tl.load(pos_ptr + tok).to(tl.int64)
    else:
        p = tok
    cs = tl.load(cos_ptr + p * s_cs + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    sn = tl.load(sin_ptr + p * s_cs + cols, mask=cm, other=0.0).to(dt).to(tl.float32)
    a = (x.to(tl.float32) * cs[None, :]).to(dt).to(tl.float32)
    b = (rot * sn[None, :]).to(dt).to(tl.float32)
    res = (a + b).to(dt)
    tl.store(out_ptr + tok * s_out + heads[:, None] * D + cols[None, :], res, mask=m)
    if WRITE_KV:
        kh = heads - HQ
        km = m & (kh >= 0)[:, None]
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        kp = tl.load(kvpos_ptr + tok).to(tl.int64)
        cache = slot * s_cslot + kh[:, None].to(tl.int64) * s_chead + kp * s_cpos + cols[None, :]
        tl.store(kc_ptr + cache, res, mask=km)
        v = tl.load(qkv_ptr + tok * s_qkv + (NH + kh)[:, None] * D + cols[None, :], mask=km, other=0.0)
        tl.store(vc_ptr + cache, v, mask=km)


def qk_norm_rope(qkv: torch.Tensor, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                 cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
                 hq: int, hkv: int, d: int, eps: float,
                 kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                 kv_slots: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [N, (hq + 2 hkv) * d] (rows may be strided, last dim contiguous) -> (q [N, hq, d],
    k [N, hkv, d], v [N, hkv, d]); q and k are views of one new [N, hq + hkv, d] tensor, v a view
    of qkv.

    q/k: per-head RMSNorm with q_norm_w / k_norm_w [d] (both None: no norm), then rotate-half RoPE.
    cos/sin: with ``positions`` [N], tables [max_len, d] (float32) indexed by position; without,
    per-token rows [N, d] (e.g. ``Rope.tables``' output). Either way cast to qkv's dtype first.

    ``kv_cache`` (k_cache, v_cache), each [S, hkv, L, d] with a contiguous last dim, with
    ``kv_slots`` / ``kv_positions`` [N]: also writes cache[kv_slots[n], :, kv_positions[n]] = k / v
    of token n (what ``attend`` would otherwise do with two index_put launches)."""
    n = qkv.shape[0]
    nh = hq + hkv
    if qkv.dim() != 2 or qkv.shape[1] != (nh + hkv) * d or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [N, {(nh + hkv) * d}] with a contiguous last dim, got {list(qkv.shape)}")
    if d % 8:
        raise ValueError(f"head_dim must be a multiple of 8, got {d}")
    if (q_norm_w is None) != (k_norm_w is None):
        raise ValueError("give both q_norm_w and k_norm_w, or neither")
    cos = cos.reshape(-1, d)
    sin = sin.reshape(-1, d)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((n, nh, d), dtype=qkv.dtype, device=qkv.device)
    if n:
        lanes = max(32, triton.next_power_of_2(triton.cdiv(d, 4)))
        if lanes > _TORCH_THREADS:
            raise ValueError(f"head_dim {d} too large")
        bh = QK_HEADS_PER_PROGRAM or next(b for b in (16, 8, 4, 2, 1) if nh % b == 0 and b * 4 * lanes <= 4096)
        has_norm = q_norm_w is not None
        qw = q_norm_w if has_norm else qkv
        kw = k_norm_w if has_norm else qkv
        pos = positions if positions is not None else qkv
        if kv_cache is not None:
            kc, vc = kv_cache
            if (kc.shape != vc.shape or kc.stride() != vc.stride() or kc.dim() != 4 or kc.shape[1] != hkv
                    or kc.shape[3] != d or kc.stride(-1) != 1 or kc.dtype != qkv.dtype):
                raise ValueError(f"kv_cache must be two [S, {hkv}, L, {d}] caches of qkv's dtype with a "
                                 f"contiguous last dim, got {list(kc.shape)}, {list(vc.shape)}")
            if kv_slots is None or kv_positions is None or kv_slots.shape[0] != n or kv_positions.shape[0] != n:
                raise ValueError("kv_cache needs kv_slots and kv_positions of one entry per token")
            cstr = (kc.stride(0), kc.stride(1), kc.stride(2))
        else:
            kc = vc = kv_slots = kv_positions = qkv
            cstr = (0, 0, 0)
        _qk_norm_rope_kernel[(n, triton.cdiv(nh, bh))](
            qkv, qw, kw, cos, sin, pos, out, hq, nh, d, qkv.stride(0), cos.stride(0), out.stride(0),
            eps, kc, vc, kv_slots, kv_positions, *cstr,
            BH=bh, LANES=lanes, HAS_NORM=has_norm, HAS_POS=positions is not None, EXACT=EXACT,
            FMA=_TORCH_FMA, num_warps=NUM_WARPS_QK or _warps(bh * 4 * lanes), enable_fp_fusion=False,
            WRITE_KV=kv_cache is not None, **pdl_args(qkv.device))
    v = qkv[:, nh * d:].unflatten(1, (hkv, d))  # a view, as the torch path's reshape
    return out[:, :hq], out[:, hq:], v
