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

    sec, cfg = gpu.search_tiles(run, 16, g1s, g2s, "t", check=lambda cfg: 1.0 if cfg["gemm1"]["BN"] == 32 else 1e-3)
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
    assert check(other) < gpu.TILE_TOL

    import eplb.kernels as kernels

    def broken(*args, **kw):  # what a tile with an indexing error would give
        return torch.zeros_like(fused_moe(*args, **kw))

    monkeypatch.setattr(kernels, "fused_moe", broken)
    assert check(other) >= gpu.TILE_TOL
