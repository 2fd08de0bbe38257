"""Triton split-K decode attention against the plain torch reference, and the reference itself.

The torch reference (eplb.model.attention.decode_attention_torch) test runs everywhere. The Triton
tests run on CUDA; without a GPU they run under triton's interpreter (TRITON_INTERPRET=1, float32
data, small shapes: what CI does), otherwise they skip.
"""

from __future__ import annotations

import pytest
import torch

from eplb.kernels import HAS_TRITON, triton_test_device
from eplb.model.attention import decode_attention_torch

DEV = triton_test_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(DEV != "cuda", reason="needs CUDA + triton (CUDA graphs)")

if HAS_TRITON:  # the kernel module imports triton; tests using it are marked needs_triton/needs_cuda
    from eplb.kernels.decode_attention import _MERGE_MAX_SPLITS, _decode_attention, decode_attention, split_plan

# triton's CPU interpreter gets bf16 dots wrong: under it only float32 runs
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if DEV == "cuda" else [torch.float32]
# bf16/fp16 kernel (p rounded to 16 bits before the PV dot, output rounded) vs a float32 reference on the
# same rounded inputs: outputs are convex combinations of O(1) values, so 2e-2 abs/rel covers bf16's 2^-8
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}
QWEN = (32, 4, 128)  # Hq, Hkv, D
TINY = (4, 2, 64)


def make_case(hq, hkv, d, num_slots, max_len, ctx, dtype, dev, seed=0):
    """Random caches and queries; rows use a shuffled subset of slots (non-contiguous order)."""
    g = torch.Generator().manual_seed(seed)
    b = len(ctx)
    k = torch.randn(num_slots, hkv, max_len, d, generator=g).to(dtype)
    v = torch.randn(num_slots, hkv, max_len, d, generator=g).to(dtype)
    q = (2.0 * torch.randn(b, hq, d, generator=g)).to(dtype)  # x2: peakier softmax than N(0,1) scores
    slots = torch.randperm(num_slots, generator=g)[:b]
    ctx_lens = torch.tensor(ctx, dtype=torch.int32)
    return [t.to(dev) for t in (q, k, v, slots, ctx_lens)]


def naive(q, k_cache, v_cache, slots, ctx_lens, scale):
    """Per-row, per-head float64 softmax attention: the reference for the reference."""
    b, hq, d = q.shape
    grp = hq // k_cache.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for i in range(b):
        n = int(ctx_lens[i])
        for h in range(hq):
            k = k_cache[int(slots[i]), h // grp, :n].double()
            v = v_cache[int(slots[i]), h // grp, :n].double()
            if n:
                out[i, h] = torch.softmax(k @ q[i, h].double() * scale, 0) @ v
    return out


def test_torch_reference_matches_naive_loop():
    for hq, hkv, d in (TINY, (8, 2, 16), (6, 6, 32)):
        q, k, v, slots, ctx = make_case(hq, hkv, d, 6, 40, [1, 40, 17, 0, 33], torch.float32, "cpu")
        out = decode_attention_torch(q, k, v, slots, ctx, d**-0.5)
        assert out.shape == (5, hq, d) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), naive(q, k, v, slots, ctx, d**-0.5), atol=1e-5, rtol=1e-5)
        assert (out[3] == 0).all()  # ctx_len 0 -> zeros, not NaN


def _ctx_lens(b, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, max_len + 1, (b,), generator=g).tolist()
    ctx[0], ctx[-1] = 1, max_len  # the edges: only the current token, and a full slot
    return ctx


def _check(q, k, v, slots, ctx, dtype, **knobs):
    scale = q.shape[-1] ** -0.5
    out = _decode_attention(q, k, v, slots, ctx, scale, **knobs) if knobs else decode_attention(
        q, k, v, slots, ctx, scale)
    ref = decode_attention_torch(q, k, v, slots, ctx, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# (shape, num_slots, max_len, batch): max_len not a multiple of the key block, split counts from 1 up
CASES_CUDA = [(QWEN, 12, 1100, 9), (QWEN, 6, 8300, 5), (QWEN, 40, 333, 33), (TINY, 8, 513, 7), (TINY, 3, 64, 3)]
CASES_INTERP = [(QWEN, 5, 200, 4), (TINY, 6, 130, 5)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,num_slots,max_len,b", CASES_CUDA if DEV == "cuda" else CASES_INTERP)
def test_decode_attention_matches_reference(shape, num_slots, max_len, b, dtype):
    hq, hkv, d = shape
    q, k, v, slots, ctx = make_case(hq, hkv, d, num_slots, max_len, _ctx_lens(b, max_len, b), dtype, DEV)
    _check(q, k, v, slots, ctx, dtype)
    _check(q, k, v, slots, ctx.long(), dtype)  # int64 ctx_lens and slots int32 too
    _check(q, k, v, slots.int(), ctx, dtype)


@needs_triton
@pytest.mark.parametrize("target", [1, 64, 1 << 20], ids=["one_split_direct", "merged_in_kernel", "max_splits"])
@pytest.mark.parametrize("shape", [QWEN, TINY], ids=["qwen", "tiny"])
def test_split_extremes(shape, target):
    """num_splits 1 (the split kernel writes the output, no combine), a few (the split kernel's
    last program merges them) and as many as max_len allows (the combine launch)."""
    hq, hkv, d = shape
    dtype, max_len = DTYPES[0], 300
    ctx = [1, 300, 64, 65, 0]
    q, k, v, slots, ctx = make_case(hq, hkv, d, 7, max_len, ctx, dtype, DEV)
    _check(q, k, v, slots, ctx, dtype, target_programs=target)
    out = _decode_attention(q, k, v, slots, ctx, d**-0.5, target_programs=target)
    assert (out[4] == 0).all()


@needs_triton
@pytest.mark.parametrize("target", [1, 64, 1 << 20], ids=["one_split_direct", "merged_in_kernel", "max_splits"])
def test_fp8_output_is_the_quantized_output(target):
    """fp8_out: the output quantized per row and head, bit for bit what the FP8 GEMMs' own
    quantization launch makes of it, from either launch that writes the output."""
    from eplb.kernels.moe_triton import _quant_act_kernel

    hq, hkv, d = QWEN
    q, k, v, slots, ctx = make_case(hq, hkv, d, 7, 300, [1, 300, 64, 0], DTYPES[0], DEV, seed=2)
    assert (1 < split_plan(4, hkv, 300, target_programs=target) <= _MERGE_MAX_SPLITS) == (target == 64)
    plain = _decode_attention(q, k, v, slots, ctx, d**-0.5, target_programs=target)
    out, (q8, qs) = _decode_attention(q, k, v, slots, ctx, d**-0.5, target_programs=target, fp8_out=True)
    assert torch.equal(out, plain)
    b = q.shape[0]
    assert q8.shape == (b, hq * d) and q8.dtype == torch.float8_e4m3fn and qs.shape == (b, hq)
    flat = out.reshape(b, hq * d)
    want_q, want_s = torch.empty_like(q8), torch.empty_like(qs)
    _quant_act_kernel[(b, hq)](flat, want_q, want_s, hq * d, hq * d, hq * d, hq, G=1, USE_PDL=False)
    assert torch.equal(qs, want_s)
    assert torch.equal(q8.view(torch.uint8), want_q.view(torch.uint8))
    with pytest.raises(ValueError, match="head_dim 128"):
        t = make_case(*TINY, 3, 50, [5, 6], DTYPES[0], DEV)
        decode_attention(*t, 0.1, fp8_out=True)


@needs_triton
def test_zero_ctx_rows_and_clamp():
    hq, hkv, d = TINY
    dtype = DTYPES[0]
    q, k, v, slots, _ = make_case(hq, hkv, d, 4, 100, [0] * 4, dtype, DEV)
    ctx = torch.tensor([0, 1, 100, 500], dtype=torch.int32, device=DEV)  # 500 > L: clamped to L
    out = decode_attention(q, k, v, slots, ctx, d**-0.5)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    ref = decode_attention_torch(q, k, v, slots, ctx, d**-0.5)
    torch.testing.assert_close(out[1:].float(), ref[1:].float(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
def test_rejects_bad_shapes():
    q, k, v, slots, ctx = make_case(4, 2, 48, 2, 16, [3, 4], torch.float32, DEV)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        decode_attention(q, k, v, slots, ctx, 1.0)
    q, k, v, slots, ctx = make_case(3, 2, 64, 2, 16, [3, 4], torch.float32, DEV)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k, v, slots, ctx, 1.0)


@pytest.mark.skipif(not HAS_TRITON, reason="split_plan lives in the triton kernel module")
def test_split_plan():
    assert split_plan(1, 4, 8300) == 128  # small batch: many splits
    assert split_plan(32, 4, 8300) == 4
    assert split_plan(256, 4, 40960) == 1  # B*Hkv fills the GPU: one split, no combine launch
    assert split_plan(1, 2, 63) == 1  # no more splits than key blocks


@needs_cuda
@pytest.mark.parametrize("target", [None, 1], ids=["splits", "direct"])
@pytest.mark.parametrize("shape", [QWEN, TINY], ids=["qwen", "tiny"])
def test_cuda_graph_replay_with_new_ctx_lens(shape, target):
    hq, hkv, d = shape
    max_len, b, dtype = 2100, 6, torch.bfloat16
    q, k, v, slots, ctx = make_case(hq, hkv, d, 10, max_len, [5, 1, 700, 64, 2100, 300], dtype, "cuda")
    scale = d**-0.5
    knobs = {} if target is None else {"target_programs": target}
    _decode_attention(q, k, v, slots, ctx, scale, **knobs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _decode_attention(q, k, v, slots, ctx, scale, **knobs)
    for seed in range(3):  # replay with other lengths (longer and shorter), slots and queries
        q2, _, _, slots2, ctx2 = make_case(hq, hkv, d, 10, max_len, _ctx_lens(b, max_len, 100 + seed), dtype,
                                           "cuda", seed=100 + seed)
        q.copy_(q2)
        slots.copy_(slots2)
        ctx.copy_(ctx2)
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_torch(q, k, v, slots, ctx, scale)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
