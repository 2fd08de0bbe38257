"""Prefill attention paths of eplb.model.attention against a float32 causal reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eplb.model import attention
from eplb.model.attention import AttentionMetadata, attend


def reference(q, k, v, scale):
    """q [n, Hq, D], k/v [n, Hkv, D] -> causal attention in float32, [n, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    o = F.scaled_dot_product_attention(q.float().transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                       is_causal=True, scale=scale)
    return o.transpose(0, 1)


def run_prefills(lengths, device, dtype, hq=8, hkv=2, d=64, max_len=2304, slots=3):
    torch.manual_seed(0)
    kc = torch.randn(slots, hkv, max_len, d, device=device, dtype=dtype)  # garbage past each prompt
    vc = torch.randn_like(kc)
    n = sum(lengths)
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    meta = AttentionMetadata.build([], [(s, 0, c) for s, c in enumerate(lengths)], device=device)
    out = attend(q, k, v, kc, vc, meta, d**-0.5)
    off, errs = 0, []
    for c in lengths:
        ref = reference(q[off : off + c], k[off : off + c], v[off : off + c], d**-0.5)
        errs.append(((out[off : off + c].float() - ref).norm() / ref.norm()).item())
        off += c
    return errs


def test_prefill_paths_match_reference_cpu():
    assert max(run_prefills([5, 300], "cpu", torch.float32)) < 1e-5


def run_chunks(chunks, device, dtype, hq=8, hkv=2, d=64, max_len=2304):
    """chunks: (slot, start, cnt). Reference per chunk from the cache after attend wrote it:
    keys [0, start + cnt) of the slot, query i sees keys j <= start + i."""
    torch.manual_seed(1)
    kc = torch.randn(len(chunks), hkv, max_len, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    n = sum(c for _, _, c in chunks)
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    meta = AttentionMetadata.build([], chunks, device=device)
    out = attend(q, k, v, kc, vc, meta, d**-0.5)
    return chunk_errors(q, out, kc, vc, chunks, 0)


def chunk_errors(q, out, kc, vc, chunks, off: int) -> list[float]:
    """Relative error of each chunk's rows of ``out`` (from row ``off`` on) against float32
    attention over the cache after attend wrote it: keys [0, start + cnt) of the slot, query i
    sees keys j <= start + i."""
    g, d, errs = q.shape[1] // kc.shape[1], q.shape[2], []
    for slot, start, cnt in chunks:
        kk = kc[slot, :, : start + cnt].float().repeat_interleave(g, 0)
        vv = vc[slot, :, : start + cnt].float().repeat_interleave(g, 0)
        keys, queries = torch.arange(start + cnt, device=q.device), torch.arange(cnt, device=q.device)
        mask = keys[None, :] <= queries[:, None] + start
        ref = F.scaled_dot_product_attention(q[off : off + cnt].float().transpose(0, 1), kk, vv,
                                             attn_mask=mask, scale=d**-0.5).transpose(0, 1)
        errs.append(((out[off : off + cnt].float() - ref).norm() / ref.norm()).item())
        off += cnt
    return errs


def test_mixed_chunks_match_reference_cpu():
    assert max(run_chunks([(0, 0, 16), (1, 5, 40), (2, 0, 9)], "cpu", torch.float32)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_chunks_varlen_cudnn_and_continuations_cuda():
    """Consecutive fresh short chunks share one flash varlen call, a continuing chunk in between
    splits the run, long fresh ones go to cuDNN: every chunk must match the reference."""
    chunks = [(0, 0, 16), (1, 0, 300), (2, 5, 40), (3, 0, 77), (4, 0, 1100), (5, 0, 9)]
    errs = run_chunks(chunks, "cuda", torch.bfloat16)
    assert max(errs) < 1e-2, errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_prefill_cudnn_bucketed_matches_reference():
    """Prompts >= CUDNN_PREFILL_MIN go through cuDNN with queries padded to the bucket and the
    slot's stale cache rows as padding keys: outputs of the real rows must not see them."""
    lengths = [attention.CUDNN_PREFILL_MIN + 37, 100, 2 * attention.CUDNN_PREFILL_BUCKET]
    errs = run_prefills(lengths, "cuda", torch.bfloat16)
    assert max(errs) < 1e-2, errs  # bf16 operands: 1e-3..1e-2 relative (docs/gpu.md, Tests)


def run_decodes_and_chunks(decodes, chunks, device, dtype, hq=8, hkv=2, d=64, max_len=1024):
    """decodes: (slot, position); chunks: (slot, start, cnt), on other slots. Each decode row must
    attend keys [0, position] of its slot, each chunk as in run_chunks. -> relative errors."""
    torch.manual_seed(2)
    num_slots = 1 + max([s for s, _ in decodes] + [s for s, _, _ in chunks])
    kc = torch.randn(num_slots, hkv, max_len, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    n = len(decodes) + sum(c for _, _, c in chunks)
    q = torch.randn(n, hq, d, device=device, dtype=dtype)
    k = torch.randn(n, hkv, d, device=device, dtype=dtype)
    v = torch.randn(n, hkv, d, device=device, dtype=dtype)
    meta = AttentionMetadata.build(decodes, chunks, device=device)
    out = attend(q, k, v, kc, vc, meta, d**-0.5)
    g, errs = hq // hkv, []
    for row, (slot, pos) in enumerate(decodes):
        kk = kc[slot, :, : pos + 1].float().repeat_interleave(g, 0)  # [Hq, pos + 1, D]
        vv = vc[slot, :, : pos + 1].float().repeat_interleave(g, 0)
        ref = F.scaled_dot_product_attention(q[row].float()[:, None], kk, vv, scale=d**-0.5)[:, 0]
        errs.append(((out[row].float() - ref).norm() / ref.norm()).item())
    return errs + chunk_errors(q, out, kc, vc, chunks, len(decodes))


# decode rows of unequal lengths (a mask), not on slots 0..B-1 in order, with and without chunks
DECODES = [(3, 700), (0, 17), (5, 0), (1, 300)]


def test_decode_rows_of_eager_steps_cpu():
    assert max(run_decodes_and_chunks(DECODES, [], "cpu", torch.float32)) < 1e-5
    assert max(run_decodes_and_chunks(DECODES, [(2, 0, 30), (4, 9, 20)], "cpu", torch.float32)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_rows_of_eager_steps_cuda():
    """On CUDA the decode rows of an eager step go through the Triton decode kernel."""
    assert max(run_decodes_and_chunks(DECODES, [], "cuda", torch.bfloat16)) < 1e-2
    assert max(run_decodes_and_chunks(DECODES, [(2, 0, 30), (4, 9, 20)], "cuda", torch.bfloat16)) < 1e-2
