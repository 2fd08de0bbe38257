"""Triton residual-add + RMSNorm and q/k head norm + RoPE against the torch path they replace.

On CUDA the kernels must be bit-identical to the torch ops of ``eplb.model.transformer`` (bf16
and fp16). Without a GPU the kernel tests run only under triton's interpreter (TRITON_INTERPRET=1),
in fp16 (the interpreter rounds bf16 casts by truncation) and against torch's CPU ops, whose
float32 sum-of-squares order differs: there the bound is 1 ulp on a small fraction of elements.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eplb.kernels import triton_test_device
from eplb.model import transformer
from eplb.model.transformer import Rope
from eplb.resources import default_model_path

DEV = triton_test_device()
if DEV is None:
    pytest.skip("needs CUDA + triton (or TRITON_INTERPRET=1)", allow_module_level=True)

from eplb.kernels import qk_norm_rope, rms_norm_fused  # noqa: E402

CUDA = DEV == "cuda"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16]
NS = [1, 7, 8192] if CUDA else [1, 7]  # 8192 rows take minutes in the interpreter
MODEL = default_model_path()


def torch_rms_norm(x, w, eps, residual=None):
    """The torch path (FUSED_NORM_ROPE off), as DecoderLayer ran it: add, then rms_norm."""
    if residual is not None:
        x = residual + x
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype), x


def torch_qk(qkv, qw, kw, cos, sin, hq, hkv, d, eps):
    """Attention.forward's torch branch: heads side by side, rms_norm, Rope.apply."""
    n = qkv.shape[0]
    qk = qkv[:, : (hq + hkv) * d].reshape(n, hq + hkv, d)
    if qw is not None:
        w = torch.cat([qw.expand(hq, d), kw.expand(hkv, d)])
        qk = w * F.rms_norm(qk.float(), (d,), eps=eps).to(qk.dtype)
    qk = Rope.apply(qk, cos, sin)
    return qk[:, :hq], qk[:, hq:]


def assert_close_bits(out: torch.Tensor, ref: torch.Tensor) -> None:
    """CUDA: identical. Interpreter (CPU reference, other summation order): within 1 ulp of the
    dtype on under 1% of elements."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if CUDA:
        diff = (out != ref).sum().item()
        assert diff == 0, f"{diff} of {out.numel()} elements differ, max {(out.float() - ref.float()).abs().max()}"
        return
    ulp = torch.finfo(out.dtype).eps * ref.float().abs().clamp_min(torch.finfo(out.dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= ulp + 1e-12).all()
    assert (out != ref).float().mean().item() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("h", [2048, 256])
def test_rms_norm_fused_matches_torch(dtype, n, h) -> None:
    g = torch.Generator().manual_seed(n + h)
    x = (3 * torch.randn(n, h, generator=g)).to(dtype).to(DEV)
    res = torch.randn(n, h, generator=g).to(dtype).to(DEV)
    w = (1 + 0.2 * torch.randn(h, generator=g)).to(dtype).to(DEV)
    eps = 1e-6
    assert_close_bits(rms_norm_fused(x, w, eps), torch_rms_norm(x, w, eps)[0])
    out, r = rms_norm_fused(x, w, eps, residual=res)
    ref, ref_r = torch_rms_norm(x, w, eps, res)
    if CUDA:
        assert torch.equal(r, ref_r)
    else:
        assert (r.float() - ref_r.float()).abs().max() <= 2 * torch.finfo(dtype).eps * ref_r.float().abs().max()
    assert_close_bits(out, ref)


@pytest.mark.parametrize("n,h,with_res", [(1, 2048, True), (37, 384, False), (300, 256, True)])
def test_rms_norm_fp8_output_is_the_quantized_output(n, h, with_res) -> None:
    # the FP8 form the norm writes must be, bit for bit, what the FP8 GEMMs' own quantization
    # makes of its bf16/fp16 output (per row and 128 columns, scale amax / 448)
    from eplb.kernels import quant_dequant_act
    from eplb.kernels.moe_triton import _quant_act_kernel

    dtype = DTYPES[0]
    g = torch.Generator().manual_seed(n)
    x = (3 * torch.randn(n, h, generator=g)).to(dtype).to(DEV)
    res = torch.randn(n, h, generator=g).to(dtype).to(DEV) if with_res else None
    w = (1 + 0.2 * torch.randn(h, generator=g)).to(dtype).to(DEV)
    got = rms_norm_fused(x, w, 1e-6, res, fp8=True)
    plain = rms_norm_fused(x, w, 1e-6, res)
    if with_res:
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    else:
        assert torch.equal(got[0], plain)
    q, qs = got[-2:]
    assert q.dtype == torch.float8_e4m3fn and q.shape == (n, h) and qs.shape == (n, h // 128)
    want_q = torch.empty_like(q)
    want_s = torch.empty_like(qs)
    _quant_act_kernel[(n, h // 128)](got[0], want_q, want_s, h, h, h, h // 128, G=1, USE_PDL=False)
    assert torch.equal(qs, want_s)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    if CUDA:  # and it is the quantization the reference path emulates, up to the kernels'
        # float32 division (not IEEE-rounded in triton: a value may land one e4m3 step away;
        # triton's interpreter gets some e4m3 casts wrong, e.g. -127.0 -> -64, the same way in
        # both kernels above, so only on CUDA)
        deq = (q.float().view(n, h // 128, 128) * qs[..., None]).view(n, h).cpu()
        ref = quant_dequant_act(got[0].float().cpu())
        assert ((deq - ref).abs() <= ref.abs() * 2**-3 + 1e-6).all()
        assert (deq != ref).float().mean() < 0.05
    with pytest.raises(ValueError, match="128"):
        rms_norm_fused(x[:, :100], w[:100], 1e-6, fp8=True)


def test_rms_norm_fused_strided_rows_and_model_wrapper() -> None:
    """A column slice (row stride > H, as OLMoE's q slice of qkv) and transformer.rms_norm's dispatch."""
    dtype = DTYPES[0]
    g = torch.Generator().manual_seed(3)
    big = torch.randn(33, 3 * 256, generator=g).to(dtype).to(DEV)
    x = big[:, 256:512]
    w = (1 + 0.2 * torch.randn(256, generator=g)).to(dtype).to(DEV)
    assert_close_bits(rms_norm_fused(x, w, 1e-5), torch_rms_norm(x, w, 1e-5)[0])
    if CUDA:  # transformer.rms_norm takes the kernel only on CUDA
        res = torch.randn(33, 256, generator=g).to(dtype).to(DEV)
        fused = transformer.rms_norm(x, w, 1e-5, res)
        transformer.FUSED_NORM_ROPE = False
        try:
            plain = transformer.rms_norm(x, w, 1e-5, res)
        finally:
            transformer.FUSED_NORM_ROPE = True
        assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", [(32, 4, 128), (4, 2, 64)])  # Qwen3-30B-A3B; tiny-qwen3-moe
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_matches_torch(dtype, n, shape, norm) -> None:
    hq, hkv, d = shape
    g = torch.Generator().manual_seed(n + d)
    qkv = (2 * torch.randn(n, (hq + 2 * hkv) * d, generator=g)).to(dtype).to(DEV)
    qw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV) if norm else None
    kw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV) if norm else None
    rope = Rope(d, 1e6, 9000, DEV)
    pos = torch.randint(0, 9000, (n,), generator=g).to(DEV)
    cos, sin = rope.tables(pos, dtype)
    want_q, want_k = torch_qk(qkv, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    # per-token rows (how Attention.forward calls it) and the float32 tables + positions
    for got in (qk_norm_rope(qkv, qw, kw, cos, sin, None, hq, hkv, d, 1e-6),
                qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, hq, hkv, d, 1e-6)):
        q, k, v = got
        assert q.shape == (n, hq, d) and k.shape == (n, hkv, d) and v.shape == (n, hkv, d)
        assert_close_bits(q, want_q)
        assert_close_bits(k, want_k)
        assert torch.equal(v, qkv[:, (hq + hkv) * d:].reshape(n, hkv, d))
        assert v.data_ptr() == qkv.data_ptr() + (hq + hkv) * d * qkv.element_size()  # a view


@pytest.mark.parametrize("shape", [(32, 4, 128), (4, 2, 64)])
def test_qk_norm_rope_writes_the_kv_cache(shape) -> None:
    """With kv_cache the kernel also does attend's two index_puts: k (normed, rotated) and v land
    at [slot, :, position] of each token, and nothing else in the caches changes."""
    hq, hkv, d = shape
    dtype = DTYPES[0]
    n, slots, max_len = 5, 4, 16
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype).to(DEV)
    qw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    kw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype).to(DEV)
    rope = Rope(d, 1e6, max_len, DEV)
    tok_slot = torch.tensor([2, 0, 3, 2, 1], device=DEV)
    tok_pos = torch.tensor([5, 0, 15, 6, 9], device=DEV)
    cos, sin = rope.tables(tok_pos, dtype)
    kc = torch.randn(slots, hkv, max_len, d, generator=g).to(dtype).to(DEV)
    vc = torch.randn(slots, hkv, max_len, d, generator=g).to(dtype).to(DEV)
    want_kc, want_vc = kc.clone(), vc.clone()
    q, k, v = qk_norm_rope(qkv, qw, kw, cos, sin, None, hq, hkv, d, 1e-6, kv_cache=(kc, vc),
                           kv_slots=tok_slot, kv_positions=tok_pos)
    want_kc[tok_slot, :, tok_pos] = k
    want_vc[tok_slot, :, tok_pos] = v
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)
    with pytest.raises(ValueError, match="kv_slots"):
        qk_norm_rope(qkv, qw, kw, cos, sin, None, hq, hkv, d, 1e-6, kv_cache=(kc, vc))


def test_bad_arguments() -> None:
    x = torch.zeros(2, 6, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 4"):
        rms_norm_fused(x, torch.ones(6, dtype=torch.float16, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="qkv must be"):
        qk_norm_rope(torch.zeros(2, 10, device=DEV), None, None, torch.zeros(4, 8), torch.zeros(4, 8),
                     None, 1, 1, 8, 1e-6)


def test_empty_input() -> None:
    x = torch.zeros(0, 64, dtype=torch.float16, device=DEV)
    w = torch.ones(64, dtype=torch.float16, device=DEV)
    out, r = rms_norm_fused(x, w, 1e-6, residual=x)
    assert out.shape == (0, 64) and r.shape == (0, 64)
    q, k, v = qk_norm_rope(torch.zeros(0, 4 * 8, dtype=torch.float16, device=DEV), None, None,
                           torch.zeros(4, 8), torch.zeros(4, 8), None, 2, 1, 8, 1e-6)
    assert q.shape == (0, 2, 8) and k.shape == (0, 1, 8) and v.shape == (0, 1, 8)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_cuda_graph_capture() -> None:
    """Both launches capture (no host syncs) and replay on new input values."""
    dtype, n, h, (hq, hkv, d) = torch.bfloat16, 64, 2048, (32, 4, 128)
    x = torch.randn(n, h, device=DEV).to(dtype)
    res = torch.randn(n, h, device=DEV).to(dtype)
    w = torch.rand(h, device=DEV).to(dtype)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    qw, kw = torch.rand(d, device=DEV).to(dtype), torch.rand(d, device=DEV).to(dtype)
    rope = Rope(d, 1e6, 256, DEV)
    pos = torch.randint(0, 256, (n,), device=DEV)
    for _ in range(2):  # compile outside the capture
        rms_norm_fused(x, w, 1e-6, res)
        qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, hq, hkv, d, 1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, r = rms_norm_fused(x, w, 1e-6, res)
        q, k, _ = qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, hq, hkv, d, 1e-6)
    x.copy_(torch.randn_like(x))
    qkv.copy_(torch.randn_like(qkv))
    pos.copy_(torch.randint(0, 256, (n,), device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_r = rms_norm_fused(x, w, 1e-6, res)
    want_q, want_k, _ = qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, hq, hkv, d, 1e-6)
    assert torch.equal(out, want_out) and torch.equal(r, want_r)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.skipif(not CUDA, reason="the whole-model check runs the tiny model in bf16 on CUDA")
def test_tiny_model_logits_with_and_without_kernels() -> None:
    """The shipped tiny-qwen3-moe, bf16 on CUDA: two prompts prefilled in one flattened step, then a
    decode step; logits with the kernels equal those of the torch path bit for bit."""
    from eplb.model import AttentionMetadata, load_model

    model, cfg = load_model(str(MODEL), dtype="bfloat16", device=DEV, max_len=256)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g) for n in (37, 100)]

    def run() -> list[torch.Tensor]:
        shape = (2, cfg.num_kv_heads, 256, cfg.head_dim)
        kv = [(torch.zeros(shape, dtype=torch.bfloat16, device=DEV),
               torch.zeros(shape, dtype=torch.bfloat16, device=DEV)) for _ in range(cfg.num_layers)]
        with torch.no_grad():
            meta = AttentionMetadata.build([], [(i, 0, len(p)) for i, p in enumerate(prompts)], DEV)
            pre = model.compute_logits(model(torch.cat(prompts).to(DEV), meta, kv))
            nxt = torch.tensor([3, 4], device=DEV)
            meta = AttentionMetadata.build([(0, 37), (1, 100)], [], DEV)
            dec = model.compute_logits(model(nxt, meta, kv))
        return [pre, dec]

    fused = run()
    transformer.FUSED_NORM_ROPE = False
    try:
        plain = run()
    finally:
        transformer.FUSED_NORM_ROPE = True
    for a, b in zip(fused, plain):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"max |diff| {(a.float() - b.float()).abs().max().item()}"


def test_num_warps_is_a_power_of_two_for_every_size() -> None:
    from eplb.kernels.norm_rope import _warps

    for elems in range(0, 20000, 64):
        w = _warps(elems)
        assert 1 <= w <= 8 and w & (w - 1) == 0, (elems, w)
