"""The tile tuners' search (bench/gpu.py): a tile whose output is wrong is never picked, however fast."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import gpu  # noqa: E402


def test_search_skips_a_fast_tile_with_wrong_output():
    g1s = [{"BN": 64}, {"BN": 128}, {"BN": 32}]
    g2s = [{"BN": 64}, {"BN": 128}]
    seconds = {32: 1.0, 64: 3.0, 128: 2.0}  # gemm1 BN 32 is fastest, but wrong

    def run(cfg):
        return seconds[cfg["gemm1"]["BN"]] + seconds[cfg["gemm2"]["BN"]] / 10

    def check(cfg):
        return 1.0 if cfg["gemm1"]["BN"] == 32 else 1e-3, gpu.TILE_TOL

    sec, cfg = gpu.search_tiles(run, 16, g1s, g2s, "t", check=check)
    assert cfg == {"BM": 16, "gemm1": {"BN": 128}, "gemm2": {"BN": 128}}
    assert sec == pytest.approx(2.2)
    # without the check the wrong tile would have won
    assert gpu.search_tiles(run, 16, g1s, g2s, "t")[1]["gemm1"] == {"BN": 32}


def test_moe_checker_accepts_other_tiles_and_rejects_a_wrong_result(monkeypatch):
    from eplb.kernels import fused_moe, triton_test_device

    dev = triton_test_device()
    if dev is None:
        pytest.skip("no Triton device (a GPU, or TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(0)
    s, h, i, t, k = 4, 128, 64, 3, 2
    w13 = (torch.randn(s, 2 * i, h, generator=g) / h**0.5).to(torch.bfloat16).to(dev)
    w2 = (torch.randn(s, h, i, generator=g) / i**0.5).to(torch.bfloat16).to(dev)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16).to(dev)
    slots = torch.randint(0, s, (t, k), generator=g).to(dev)
    weights = torch.rand(t, k, generator=g).to(dev)
    check = gpu.moe_checker(x, (slots, weights), (w13, w2), {})
    other = {"BM": 16, "gemm1": {"BN": 32, "BK": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
             "gemm2": {"BN": 64, "BK": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}}
    assert check(other)[0] < gpu.TILE_TOL and check(other)[1] == gpu.TILE_TOL

    import eplb.kernels as kernels

    def broken(*args, **kw):  # what a tile with an indexing error would give
        return torch.zeros_like(fused_moe(*args, **kw))

    monkeypatch.setattr(kernels, "fused_moe", broken)
    assert check(other)[0] >= gpu.TILE_TOL


def test_fp8_moe_checker_measures_against_the_emulated_fp8_path(monkeypatch):
    # FP8 tiles round h differently from one another: each is held to the float32 emulation of
    # the FP8 path (moe_torch, act_quant), not to the shipped tile's output
    import eplb.kernels as kernels
    from eplb.kernels import moe_torch, quantize_block_fp8
    from eplb.model.checkpoint import dequantize_block_fp8

    g = torch.Generator().manual_seed(1)
    s, h, i, t, k = 4, 256, 128, 5, 2
    q13, s13 = quantize_block_fp8(torch.randn(s, 2 * i, h, generator=g) / h**0.5)
    q2, s2 = quantize_block_fp8(torch.randn(s, h, i, generator=g) / i**0.5)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    slots = torch.randint(0, s, (t, k), generator=g)
    weights = torch.rand(t, k, generator=g)
    emulated = moe_torch(x.float(), slots, weights, dequantize_block_fp8(q13, s13, [128, 128]),
                         dequantize_block_fp8(q2, s2, [128, 128]), act_quant=True)
    outputs = iter([emulated, emulated.to(torch.bfloat16), torch.zeros_like(emulated)])
    monkeypatch.setattr(kernels, "fused_moe", lambda *a, **kw: next(outputs))
    check = gpu.moe_checker(x, (slots, weights), (q13, q2), {"w13_scale": s13, "w2_scale": s2})
    err, tol = check({})
    assert err < 1e-6 and tol == gpu.FP8_TILE_TOL
    err, _ = check({})  # rounded to bf16 (the kernels' output): off, but by a rounding
    assert 0 < err < gpu.FP8_TILE_TOL
    assert check({})[0] >= gpu.FP8_TILE_TOL  # an indexing error
