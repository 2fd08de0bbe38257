"""Triton fused MoE (bf16 and block-FP8) against the plain torch path.

Runs on CUDA with triton. Without a GPU it runs under triton's interpreter (TRITON_INTERPRET=1
with triton installed: what CI does, scripts/run_tests.sh sets it), otherwise it skips.
"""

from __future__ import annotations

import pytest
import torch

from eplb.kernels import moe_pairs_torch, moe_torch, quantize_block_fp8, triton_test_device

DEV = triton_test_device()
if DEV is None:
    pytest.skip("needs CUDA + triton (or TRITON_INTERPRET=1)", allow_module_level=True)

from eplb.kernels import fused_experts, fused_moe, fused_moe_pairs  # noqa: E402
from eplb.model.checkpoint import dequantize_block_fp8  # noqa: E402

# triton's CPU interpreter gets bf16 dots wrong, so under it the kernels run on float32 data
BF16 = torch.bfloat16 if DEV == "cuda" else torch.float32
# bf16 operands (8 significant bits) summed in float32 give a relative error between 1e-3 and 1e-2;
# we take the top of that range (docs/gpu.md, Tests)
BF16_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_case(t, h, i, s_local, k, frac_local=0.7, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(BF16)
    w13 = (torch.randn(s_local, 2 * i, h, generator=g) / h**0.5).to(BF16)
    w2 = (torch.randn(s_local, h, i, generator=g) / i**0.5).to(BF16)
    # k distinct slots per token out of a larger "global" pool; those beyond s_local are remote (-1)
    n_global = max(k, int(round(s_local / frac_local)))
    slot = torch.stack([torch.randperm(n_global, generator=g)[:k] for _ in range(t)]) if t else \
        torch.empty(0, k, dtype=torch.long)
    slot = torch.where(slot < s_local, slot, torch.full_like(slot, -1))
    wt = torch.rand(t, k, generator=g)
    wt = wt / wt.sum(-1, keepdim=True)
    return [a.to(dev) for a in (x, slot, wt, w13, w2)]


def reference(x, slot, wt, w13, w2, act_quant=False):
    # float32 weights/activations on the CPU: the higher-precision reference
    return moe_torch(x.float().cpu(), slot.cpu(), wt.float().cpu(), w13.float().cpu(),
                     w2.float().cpu(), act_quant=act_quant)


SHAPES = [  # (T, H, I, S, k)
    (1, 256, 128, 8, 4),
    (5, 256, 128, 8, 2),
    (37, 384, 256, 16, 4),
    (130, 256, 128, 12, 8),
]


@pytest.mark.parametrize("t,h,i,s,k", SHAPES)
def test_bf16_matches_torch(t, h, i, s, k):
    x, slot, wt, w13, w2 = make_case(t, h, i, s, k, seed=t)
    out, load = fused_moe(x, slot, wt, w13, w2, return_load=True)
    ref = reference(x, slot, wt, w13, w2)
    assert out.shape == (t, h) and out.dtype == BF16
    assert rel_err(out.cpu(), ref) < BF16_TOL
    # load per local slot = pairs routed there
    want = torch.bincount(slot[slot >= 0].cpu(), minlength=s)
    assert torch.equal(load.cpu().long(), want)


def test_bf16_non_multiple_k_and_all_remote_tokens():
    # H not a multiple of the K block exercises the masked K loop; token 0 has no local pair
    x, slot, wt, w13, w2 = make_case(9, 200, 96, 6, 3, seed=3)
    slot[0] = -1
    out = fused_moe(x, slot, wt, w13, w2)
    ref = reference(x, slot, wt, w13, w2)
    assert rel_err(out.cpu(), ref) < BF16_TOL
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("config_key", ["8", "2048", "65536"])
def test_bf16_every_table_config_is_correct(config_key):
    from eplb.kernels.tile_table import TABLE

    cfg = TABLE["bf16"][config_key]
    x, slot, wt, w13, w2 = make_case(70, 256, 128, 10, 4, seed=11)
    out = fused_moe(x, slot, wt, w13, w2, config=cfg)
    assert rel_err(out.cpu(), reference(x, slot, wt, w13, w2)) < BF16_TOL


def test_pairs_and_expert_fn_contract():
    x, slot, wt, w13, w2 = make_case(23, 256, 128, 8, 4, seed=5)
    y = fused_moe_pairs(x, slot, None, w13, w2)
    ref = moe_pairs_torch(x.float().cpu(), slot.cpu(), None, w13.float().cpu(), w2.float().cpu())
    assert y.shape == (23, 4, 256)
    assert rel_err(y.cpu(), ref) < BF16_TOL
    assert torch.all(y[slot < 0] == 0)
    yw = fused_moe_pairs(x, slot, wt, w13, w2)
    assert rel_err(yw.cpu(), ref * wt.cpu()[..., None]) < BF16_TOL
    # expert_fn(x[N, H], local_slot[N]) -> [N, H], unweighted
    pairs = (slot >= 0).nonzero()
    xn = x[pairs[:, 0]]
    sn = slot[pairs[:, 0], pairs[:, 1]]
    yn = fused_experts(xn, sn, w13, w2)
    assert rel_err(yn.cpu(), ref[pairs[:, 0].cpu(), pairs[:, 1].cpu()]) < BF16_TOL


def test_output_written_everywhere_and_deterministic():
    x, slot, wt, w13, w2 = make_case(64, 256, 128, 8, 4, seed=9)
    a = fused_moe(x, slot, wt, w13, w2)
    b = fused_moe(x, slot, wt, w13, w2)
    assert torch.equal(a, b)  # pair order inside a slot varies (atomics); results must not


@pytest.mark.parametrize("t,s,k", [(75, 12, 8), (9, 200, 4)])
def test_single_program_sort_matches_the_multi_program_sort(monkeypatch, t, s, k):
    # the decode-size sort (one program) and the large-call sort (count + scatter launches) must
    # give the same loads and the same outputs (each output row is computed alone, so the order
    # of pairs inside a slot cannot show); 600 pairs: both are eligible
    from eplb.kernels import moe_triton

    x, slot, wt, w13, w2 = make_case(t, 256, 128, s, k, seed=t)
    small, load_small = fused_moe(x, slot, wt, w13, w2, return_load=True)
    monkeypatch.setattr(moe_triton, "SMALL_ALIGN_MAX_PAIRS", 0)
    large, load_large = fused_moe(x, slot, wt, w13, w2, return_load=True)
    assert torch.equal(load_small, load_large)
    assert torch.equal(small, large)
    assert torch.equal(load_small.cpu().long(), torch.bincount(slot[slot >= 0].cpu(), minlength=s))


def test_zero_tokens():
    x, slot, wt, w13, w2 = make_case(0, 256, 128, 8, 4)
    out, load = fused_moe(x, slot, wt, w13, w2, return_load=True)
    assert out.shape == (0, 256) and int(load.sum()) == 0


def test_bad_shapes_raise():
    x, slot, wt, w13, w2 = make_case(4, 256, 128, 8, 4)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, slot, wt, w13, w2[:, :, :64])
    with pytest.raises(ValueError, match="topk_slot"):
        fused_moe(x, slot[:2], wt, w13, w2)


def _fp8_case(t, h, i, s, k, seed):
    x, slot, wt, w13, w2 = make_case(t, h, i, s, k, seed=seed)
    q13, s13 = quantize_block_fp8(w13.float())
    q2, s2 = quantize_block_fp8(w2.float())
    d13 = dequantize_block_fp8(q13, s13, [128, 128])
    d2 = dequantize_block_fp8(q2, s2, [128, 128])
    return x, slot, wt, q13, s13, q2, s2, d13, d2


FP8_OK = DEV == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("t,s,k", [(1, 8, 4), (33, 16, 8), (300, 12, 4)])
def test_fp8_matches_dequantized_path(t, s, k):
    h, i = 384, 256
    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(t, h, i, s, k, seed=t + 1)
    out = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2)
    # (1) Against the same function in float32 (activations rounded through e4m3 per token and
    # 128-group exactly like the kernel, weights dequantized): only accumulation order and the bf16
    # intermediate differ, plus an occasional e4m3 rounding flip of an intermediate value, so the
    # bf16 tolerance with 2x margin holds.
    emu = reference(x, slot, wt, d13.to(DEV), d2.to(DEV), act_quant=True)
    assert rel_err(out.cpu(), emu) < 2 * BF16_TOL
    # (2) Against the dequantized bf16 path without activation quantization: e4m3 keeps 3 mantissa
    # bits, so round-to-nearest has relative error <= 2^-4 and RMS ~2^-4/sqrt(3) ~ 3.6% per element;
    # a dot product of independent errors keeps that relative RMS, and two quantized matmuls in
    # series give ~5%. 8% leaves margin and still fails on any wrong scale (off by >= 2x).
    ref = reference(x, slot, wt, d13.to(DEV), d2.to(DEV))
    err = rel_err(out.cpu(), ref)
    assert 1e-3 < err < 8e-2  # > 1e-3: the activations really were quantized


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
def test_fp8_scales_are_applied_per_block():
    # scaling one expert's block scales by 4 must scale that expert's contribution accordingly
    h, i = 256, 128
    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(16, h, i, 4, 2, seed=4)
    s2b = s2.clone()
    s2b[1] *= 4
    d2b = dequantize_block_fp8(q2, s2b, [128, 128])
    out = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2b)
    emu = reference(x, slot, wt, d13.to(DEV), d2b.to(DEV), act_quant=True)
    assert rel_err(out.cpu(), emu) < 2 * BF16_TOL


def _cfg(bm, bn1, bn2, fp8, swap=(False, False)):
    def c(bn, sw):
        return {"BN": bn, "BK": 128 if fp8 else 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 3, "SWAP": sw}
    return {"BM": bm, "gemm1": c(bn1, swap[0]), "gemm2": c(bn2, swap[1])}


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("bm,bn1,bn2,swap", [(16, 128, 128, (True, True)), (16, 64, 64, (True, True)),
                                            (32, 128, 256, (True, False)), (16, 256, 256, (False, True))])
def test_fp8_swapped_dots(bm, bn1, bn2, swap):
    # transposed dots (weight columns as the MMA's M side), each GEMM alone and both, both h paths
    # (BN 128: h quantized in gemm1; else by gemm2) and tiles wider than one scale block
    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(90, 256, 512, 10, 4, seed=bm + bn1)
    out = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2,
                    config=_cfg(bm, bn1, bn2, True, swap))
    emu = reference(x, slot, wt, d13.to(DEV), d2.to(DEV), act_quant=True)
    assert rel_err(out.cpu(), emu) < 2 * BF16_TOL
    plain = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=_cfg(bm, bn1, bn2, True))
    assert rel_err(out.cpu(), plain.cpu()) < BF16_TOL


@pytest.mark.parametrize("bm,bn1,bn2,swap", [(16, 64, 64, (True, True)), (32, 32, 128, (False, True)),
                                            (16, 128, 64, (True, False))])
def test_bf16_swapped_dots(bm, bn1, bn2, swap):
    # uneven K (I = 96 with BK 64) takes the masked loads
    x, slot, wt, w13, w2 = make_case(37, 128, 96, 6, 4, seed=bm + bn1)
    out = fused_moe(x, slot, wt, w13, w2, config=_cfg(bm, bn1, bn2, False, swap))
    assert rel_err(out.cpu(), reference(x, slot, wt, w13, w2)) < BF16_TOL


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("bm,bn1,bn2", [(16, 32, 64), (64, 128, 128), (32, 128, 64)])
def test_fp8_both_intermediate_paths(bm, bn1, bn2):
    # gemm1 BN == 128: h quantized in gemm1's epilogue; else gemm2 quantizes it after loading
    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(90, 256, 384, 10, 4, seed=bm + bn1)
    out = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=_cfg(bm, bn1, bn2, True))
    emu = reference(x, slot, wt, d13.to(DEV), d2.to(DEV), act_quant=True)
    assert rel_err(out.cpu(), emu) < 2 * BF16_TOL


@pytest.mark.parametrize("t,k,bn2,fp8", [(1, 8, 64, False), (37, 4, 128, False), (20, 8, 64, True),
                                        (33, 2, 128, True)])
def test_sum_over_k_in_the_down_projection_gives_the_same_bits(t, k, bn2, fp8, monkeypatch):
    # all_local: gemm2's last-arriving pair of each (token, column tile) sums the k rows, in k order
    from eplb.kernels import moe_triton

    x, slot, wt, w13, w2 = make_case(t, 256, 384 if fp8 else 128, 10, k, frac_local=1.0, seed=t)
    kw = {}
    if fp8:
        (w13, kw["w13_scale"]), (w2, kw["w2_scale"]) = quantize_block_fp8(w13.float()), quantize_block_fp8(w2.float())
    assert (slot >= 0).all()
    monkeypatch.setattr(moe_triton, "SUM_IN_GEMM2_MAX_TOKENS", 256)
    cfg = _cfg(16, 128 if fp8 else 64, bn2, fp8, (fp8, fp8))
    want = fused_moe(x, slot, wt, w13, w2, config=cfg, **kw)
    for _ in range(2):  # the second call finds its counters reset by the first
        assert torch.equal(fused_moe(x, slot, wt, w13, w2, config=cfg, all_local=True, **kw), want)
    monkeypatch.setattr(moe_triton, "SUM_IN_GEMM2_MAX_TOKENS", t - 1)  # too many tokens: _sum_kernel
    assert torch.equal(fused_moe(x, slot, wt, w13, w2, config=cfg, all_local=True, **kw), want)


@pytest.mark.parametrize("bn1,bn2", [(128, 64), (64, 128)])
def test_fp8_bulk_copy_tiles_give_the_same_bits(bn1, bn2):
    # weight tiles through tensor descriptors (TMA) instead of pointer loads: the same bits
    x, slot, wt, q13, s13, q2, s2, _, _ = _fp8_case(20, 256, 384, 10, 4, seed=bn1)
    cfg = _cfg(16, bn1, bn2, True, (True, True))
    want = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=cfg)
    tma = {"BM": 16, "gemm1": dict(cfg["gemm1"], TMA=True), "gemm2": dict(cfg["gemm2"], TMA=True)}
    assert torch.equal(fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=tma), want)


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
def test_fp8_64_wide_gate_up_tiles_at_full_size():
    """Qwen3-30B-A3B's expert shape at 128 tokens (where the tile tuner rejected every 64-wide
    gate/up tile against the 128-wide ones): through TMA they give the pointer loads' bits, and
    both widths stay within the FP8 path's tolerance of the emulated reference (64 wide: h stored
    in bf16, quantized by the down projection; 128 wide: quantized from float32)."""
    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(128, 2048, 768, 32, 8, seed=7)
    emu = reference(x, slot, wt, d13.to(DEV), d2.to(DEV), act_quant=True)
    outs = {}
    for bn1 in (64, 128):
        for tma in (False, True):
            cfg = _cfg(16, bn1, 128, True, (True, True))
            cfg = {"BM": 16, "gemm1": dict(cfg["gemm1"], TMA=tma), "gemm2": dict(cfg["gemm2"], TMA=tma)}
            outs[bn1, tma] = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=cfg)
    assert torch.equal(outs[64, True], outs[64, False]) and torch.equal(outs[128, True], outs[128, False])
    for bn1 in (64, 128):
        assert rel_err(outs[bn1, False].cpu(), emu) < 2 * BF16_TOL, bn1


def test_fp8_bulk_copy_request_falls_back_where_it_cannot_apply():
    # I = 384 is not a multiple of BN 256: the tile would straddle gate and up, so pointer loads
    from eplb.kernels.moe_triton import _weight_desc

    x, slot, wt, q13, s13, q2, s2, _, _ = _fp8_case(20, 256, 384, 10, 4, seed=5)
    wide = {"BN": 256, "BK": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3, "SWAP": True, "TMA": True}
    assert _weight_desc(q13, wide, True, 384, 128) is None
    assert _weight_desc(q13, dict(wide, BN=128), True, 384, 128) is not None
    assert _weight_desc(q13, dict(wide, BN=128, SWAP=False), True, 384, 128) is None
    shifted = torch.empty(q13.numel() + 1, dtype=q13.dtype, device=q13.device)[1:].view(q13.shape)
    assert _weight_desc(shifted, dict(wide, BN=128), True, 384, 128) is None  # base not 16-byte aligned
    cfg = {"BM": 16, "gemm1": wide, "gemm2": dict(wide, BN=128)}
    want = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2,
                     config={"BM": 16, "gemm1": dict(wide, TMA=False), "gemm2": dict(wide, BN=128, TMA=False)})
    assert torch.equal(fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=cfg), want)


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("t", [3, 300])
def test_fp8_prequantized_x_is_bit_identical(t):
    # x_fp8 (as the RMSNorm launch writes it) instead of quantizing x here: the same bits
    from eplb.kernels.moe_triton import _quant_act_kernel

    x, slot, wt, q13, s13, q2, s2, _, _ = _fp8_case(t, 256, 384, 10, 4, seed=t)
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEV)
    xs = torch.empty((t, 2), dtype=torch.float32, device=DEV)
    _quant_act_kernel[(t, 2)](x, xq, xs, 256, 256, 256, 2, G=1, USE_PDL=False)
    want = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2)
    got = fused_moe(torch.full_like(x, float("nan")), slot, wt, q13, q2, w13_scale=s13, w2_scale=s2,
                    x_fp8=(xq, xs))  # x itself is not read
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="x_fp8"):
        fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, x_fp8=(xq, xs[:, :1]))


@pytest.mark.parametrize("bm,bn1,bn2", [(128, 128, 256), (64, 64, 128)])
def test_bf16_large_tiles(bm, bn1, bn2):
    x, slot, wt, w13, w2 = make_case(300, 256, 256, 6, 4, seed=bm)
    out = fused_moe(x, slot, wt, w13, w2, config=_cfg(bm, bn1, bn2, False))
    assert rel_err(out.cpu(), reference(x, slot, wt, w13, w2)) < BF16_TOL


@pytest.mark.parametrize("t,e,k,renorm", [(1, 128, 8, True), (37, 128, 8, False), (300, 60, 4, True)])
def test_softmax_topk_matches_torch(t, e, k, renorm):
    from eplb.kernels import softmax_topk

    # bf16 logits tie often (8 mantissa bits), so compare the probabilities picked, not the ids
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t)).to(BF16).to(DEV)
    w, ids = softmax_topk(logits, k, renorm)
    p = torch.softmax(logits.float(), -1)
    rw, rids = torch.topk(p, k, -1)
    picked = p.gather(1, ids)
    torch.testing.assert_close(picked.cpu(), rw.cpu(), rtol=1e-5, atol=1e-7)
    assert torch.all(ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1])  # k distinct
    if renorm:
        rw = rw / rw.sum(-1, keepdim=True)
    torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6)
    # float32 logits: no ties, so the ids match torch's exactly (descending order too)
    l32 = torch.randn(t, e, generator=torch.Generator().manual_seed(t + 1)).to(DEV)
    assert torch.equal(softmax_topk(l32, k, renorm)[1].cpu(), torch.topk(l32, k, -1)[1].cpu())


@pytest.mark.parametrize("num_real", [None, 5, "tensor"])
def test_route_topk_matches_the_torch_tail(num_real):
    """route_topk = softmax_topk + cast + slot map + load count of the real rows, in one launch:
    the same weights (rounded once), the map's slots and exact counts (accumulated on top of
    what the load buffer held)."""
    from eplb.kernels import route_topk, softmax_topk

    t, e, k = 37, 128, 8
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(3)).to(DEV)
    slot_of = torch.randperm(e, generator=torch.Generator().manual_seed(4)).to(DEV)
    table = torch.full((e, 3), -1, dtype=torch.long, device=DEV)
    table[:, 0] = slot_of  # column 0 of a log2phy-like buffer: a strided view
    load = torch.arange(e, dtype=torch.long, device=DEV)  # counts add to what is there
    n = t if num_real is None else 9 if num_real == "tensor" else num_real
    nr = torch.tensor(9, device=DEV) if num_real == "tensor" else num_real
    w, ids, slots = route_topk(logits, k, True, weight_dtype=BF16, slot_map=table[:, 0], load=load,
                               num_real=nr)
    rw, rids = softmax_topk(logits, k, True)
    assert torch.equal(ids.cpu(), rids.cpu())
    assert w.dtype == BF16 and torch.equal(w.cpu(), rw.to(BF16).cpu())
    assert torch.equal(slots.cpu(), slot_of[rids].cpu())
    want = torch.arange(e) + torch.bincount(rids[:n].reshape(-1).cpu(), minlength=e)
    assert torch.equal(load.cpu(), want)
    # nothing asked for: no slots, the load untouched
    _, _, none = route_topk(logits, k, True)
    assert none is None
    with pytest.raises(ValueError, match="slot_map"):
        route_topk(logits, k, True, slot_map=table[:, 0].int())


@pytest.mark.parametrize("t,e,k,s", [(1, 16, 4, 16), (5, 16, 2, 24), (16, 32, 4, 32), (23, 16, 8, 16)])
def test_route_topk_sorts_the_pairs_for_the_moe(t, e, k, s):
    """route_topk(pair_sort=...) writes the slot-sorted pair layout that fused_moe's own sort
    launch would: fused_moe given it returns the same bits, with the same per-slot counts."""
    from eplb.kernels import fused_moe, route_topk
    from eplb.kernels.moe_triton import new_pair_sort

    g = torch.Generator().manual_seed(t)
    h, i = 128, 64
    x = torch.randn(t, h, generator=g).to(BF16).to(DEV)
    w13 = (torch.randn(s, 2 * i, h, generator=g) / h**0.5).to(BF16).to(DEV)
    w2 = (torch.randn(s, h, i, generator=g) / i**0.5).to(BF16).to(DEV)
    logits = torch.randn(t, e, generator=g).to(DEV)
    slot_of = torch.randperm(s, generator=g)[:e].to(DEV)  # single replicas over more slots than experts
    sort = new_pair_sort(t * k, s, False, torch.device(DEV))
    w, _, slots = route_topk(logits, k, True, weight_dtype=BF16, slot_map=slot_of, pair_sort=sort)
    # the layout itself: each slot's pairs from its start, padding to BM, the blocks' slot ids
    flat = slots.reshape(-1).cpu()
    ids, blocks, counts, starts = (v.cpu().long() for v in (sort.sorted_ids, sort.block_slot, sort.counts,
                                                            sort.starts))
    padded = (counts + sort.bm - 1) // sort.bm * sort.bm
    assert int(sort.num_post.item()) == int(padded.sum())
    for sl in range(s):
        a, c = int(starts[sl]), int(counts[sl])
        assert sorted(ids[a:a + c].tolist()) == (flat == sl).nonzero().flatten().tolist()
        assert (ids[a + c:a + int(padded[sl])] == t * k).all()
        assert (blocks[a // sort.bm:(a + int(padded[sl])) // sort.bm] == sl).all()
    want, want_counts = fused_moe(x, slots, w, w13, w2, return_load=True, all_local=True)
    got, counts = fused_moe(x, slots, w, w13, w2, return_load=True, all_local=True, pair_sort=sort)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(counts.cpu(), want_counts.cpu())
    assert torch.equal(counts.cpu().long(), torch.bincount(slots.reshape(-1).cpu(), minlength=s))
    # a sort made for another call is refused
    with pytest.raises(ValueError, match="pair_sort"):
        fused_moe(x, slots, w, w13, w2, pair_sort=new_pair_sort(t * k, s + 1, False, torch.device(DEV)))
    with pytest.raises(ValueError, match="pair_sort"):
        route_topk(logits, k, True, pair_sort=sort)  # no slot map


def _linear_case(m, n, k):
    """x [m, k] and a block-FP8 weight [n, k] with its scales on DEV, seeded by m."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(BF16).to(DEV)
    q, s = quantize_block_fp8(torch.randn(n, k, generator=g) / k**0.5)
    return x, q.to(DEV), s.to(DEV)


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (50, 512, 256), (3000, 384, 512)])
def test_fp8_linear(m, n, k):
    from eplb.kernels import fp8_linear, quant_dequant_act

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEV)
    q, s = quantize_block_fp8(torch.randn(n, k, generator=g) / k**0.5)
    d = dequantize_block_fp8(q, s, [128, 128])
    y = fp8_linear(x, q.to(DEV), s.to(DEV))
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    emu = quant_dequant_act(x.float().cpu()) @ d.T  # same function in float32
    assert rel_err(y.cpu(), emu) < 2 * BF16_TOL
    assert 1e-3 < rel_err(y.cpu(), x.float().cpu() @ d.T) < 8e-2


@pytest.mark.parametrize("m,bm,bn", [(1, 16, 64), (24, 16, 128), (24, 32, 64), (40, 16, 256)])
def test_fp8_linear_transposed_and_bulk_copy_tiles(m, bm, bn):
    # SWAP: y^T = w x^T (another MMA, so within bf16 rounding of the plain tiles); TMA: the same
    # dots fed by the bulk copy engine, so the same bits as SWAP alone
    from eplb.kernels.linear_fp8 import fp8_linear

    n, k = 512, 512
    x, q, s = _linear_case(m, n, k)
    base = dict(BM=bm, BN=bn, KSUB=2, num_warps=4, num_stages=2)
    plain = fp8_linear(x, q, s, config=base)
    swap = fp8_linear(x, q, s, config=dict(base, SWAP=True))
    assert rel_err(swap.cpu(), plain.cpu()) < BF16_TOL
    assert torch.equal(fp8_linear(x, q, s, config=dict(base, SWAP=True, TMA=True)), swap)


@pytest.mark.parametrize("m,split,swap", [(1, 2, True), (3, 4, False), (20, 8, True)])
def test_fp8_linear_split_k_sums_the_same_product(m, split, swap):
    # split-K adds float32 partials of K ranges in split order: the unsplit tile's product within
    # a rounding, the same bits on every run (the last-arrival counters are reset for the next)
    from eplb.kernels import arrival
    from eplb.kernels.linear_fp8 import fp8_linear

    n, k = 256, 1024
    x, q, s = _linear_case(m, n, k)
    base = dict(BM=16, BN=64, KSUB=1, num_warps=4, num_stages=2, SWAP=swap)
    whole = fp8_linear(x, q, s, config=base)
    parts = fp8_linear(x, q, s, config=dict(base, SPLIT=split))
    assert rel_err(parts.cpu(), whole.cpu()) < (BF16_TOL if DEV == "cuda" else 1e-5)  # bf16 output on a GPU
    assert torch.equal(fp8_linear(x, q, s, config=dict(base, SPLIT=split)), parts)
    assert not arrival.arrival_counters(DEV, 1).any()
    # a split that leaves one program without a whole loop iteration is refused
    with pytest.raises(ValueError, match="SPLIT"):
        fp8_linear(x, q, s, config=dict(base, KSUB=4, SPLIT=4))


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("m", [1, 24, 64, 200])
def test_fp8_linear_configs_agree_bit_for_bit(m):
    # K blocks are accumulated in the same order whatever KSUB, and x given pre-quantized
    # (x_fp8) is what the separate launch makes of it: the same bits every way
    from eplb.kernels.linear_fp8 import fp8_linear, pick_config
    from eplb.kernels.moe_triton import _quant_act_kernel

    n, k = 512, 1024
    x, q, s = _linear_case(m, n, k)  # (a GPU test: BF16 is bfloat16 here)
    base = pick_config(m, n, k)
    want = fp8_linear(x, q, s, config=dict(base, KSUB=1, num_stages=2))
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEV)
    xs = torch.empty((m, k // 128), dtype=torch.float32, device=DEV)
    _quant_act_kernel[(m, k // 128)](x, xq, xs, k, k, k, k // 128, G=1, USE_PDL=False)
    # KSUB blocks of both operands per pipeline stage must fit an H100's 228 KB of shared memory
    # (at M = 200 the 64 x 64 tile with KSUB 8 and 2 stages would take 256 KB: OutOfResources)
    fits = [ks for ks in (1, 2, 4, 8) if 2 * ks * 128 * (base["BM"] + base["BN"]) <= 200 * 1024]
    assert fits[-1] >= 4
    for ksub in fits:
        got = fp8_linear(x, q, s, config=dict(base, KSUB=ksub, num_stages=2))
        assert torch.equal(got, want), ksub
        pre = fp8_linear(torch.full_like(x, float("nan")), q, s, config=dict(base, KSUB=ksub, num_stages=2),
                         x_fp8=(xq, xs))  # x itself is not read
        assert torch.equal(pre, want), ksub
    with pytest.raises(ValueError, match="x_fp8"):
        fp8_linear(x, q, s, x_fp8=(xq, xs[:, :1]))
    with pytest.raises(ValueError, match="KSUB"):
        fp8_linear(x, q, s, config=dict(base, KSUB=16))


def test_arrival_counters_grow_without_freeing_what_graphs_captured():
    from eplb.kernels import arrival

    dev = torch.device("cpu")
    arrival._COUNTERS.pop(dev, None)
    first = arrival.arrival_counters(dev, 10)
    assert first.numel() >= 10 and int(first.abs().sum()) == 0
    assert arrival.arrival_counters(dev, 10) is first  # one buffer per device while it is big enough
    bigger = arrival.arrival_counters(dev, first.numel() + 1)
    assert bigger.numel() > first.numel() and int(bigger.abs().sum()) == 0
    assert any(b is first for b in arrival._OUTGROWN)  # a captured graph may still point at it
    arrival._COUNTERS.pop(dev, None)


def _fp8_table_keys():
    from eplb.kernels.tile_table import TABLE

    return list(TABLE["fp8"])


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("config_key", _fp8_table_keys())
def test_fp8_every_table_config_is_correct(config_key):
    from eplb.kernels.tile_table import TABLE

    x, slot, wt, q13, s13, q2, s2, d13, d2 = _fp8_case(70, 256, 256, 10, 4, seed=12)
    out = fused_moe(x, slot, wt, q13, q2, w13_scale=s13, w2_scale=s2, config=TABLE["fp8"][config_key])
    emu = reference(x, slot, wt, d13.to(DEV), d2.to(DEV), act_quant=True)
    assert rel_err(out.cpu(), emu) < 2 * BF16_TOL
