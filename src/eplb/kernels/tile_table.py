"""Tile sizes of the fused MoE kernels per call size, tuned on an H100 (``TUNED_ON``).

Keys are the number of (token, k) pairs in a call (Qwen3-30B-A3B: 8 pairs per token); a call uses
the entry with the largest key <= its pair count. ``BM`` is the row block of the slot-sorted pairs
(shared by both GEMMs); ``gemm1`` is gate/up + SwiGLU, ``gemm2`` is down + routing weight. FP8
entries always use BK = 128 (one activation quantization group per K step). ``SWAP`` (default
False): transposed dots, weight columns on the MMA's M side (see moe_triton._gemm1_kernel). ``TMA``
(default False, FP8 with SWAP): weight tiles through the bulk tensor copy engine.
Regenerate with ``python bench/gpu.py --tune`` on the GPU to tune for (it prints a new TABLE).
"""

TUNED_ON = ('NVIDIA H100 80GB HBM3, triton 3.6, torch 2.11 (bench/gpu.py --tune, CUDA-graph timing), 2026-11-24; '
            'FP8 up to 2048 pairs re-tuned with SWAP (scripts/dev/tune_fp8_small.py), 2026-12-07; '
            'FP8 8 to 2048 pairs with TMA weight tiles (tune_fp8_small.py --tma), 2026-12-07')

TABLE: dict[str, dict[str, dict]] = {
    'bf16': {
        '8': {'BM': 16,
            'gemm1': {'BN': 64, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 4},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3}},
        '128': {'BM': 16,
            'gemm1': {'BN': 32, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 4},
            'gemm2': {'BN': 64, 'BK': 256, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3}},
        '512': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3},
            'gemm2': {'BN': 64, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3}},
        '2048': {'BM': 32,
            'gemm1': {'BN': 64, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3}},
        '8192': {'BM': 64,
            'gemm1': {'BN': 64, 'BK': 64, 'GROUP_M': 8, 'num_warps': 4, 'num_stages': 4},
            'gemm2': {'BN': 128, 'BK': 64, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4}},
        '65536': {'BM': 128,
            'gemm1': {'BN': 128, 'BK': 64, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 3},
            'gemm2': {'BN': 256, 'BK': 64, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 3}}
    },
    'fp8': {
        '8': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 5, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 64, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 4, 'SWAP': True, 'TMA': True}},
        '128': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 3, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 3, 'SWAP': True, 'TMA': True}},
        '256': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 3, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3, 'SWAP': True, 'TMA': True}},
        '512': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 5, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3, 'SWAP': True, 'TMA': True}},
        '1024': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 5, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 3, 'SWAP': True, 'TMA': True}},
        '2048': {'BM': 16,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 8, 'num_stages': 2, 'SWAP': True, 'TMA': True},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 1, 'num_warps': 4, 'num_stages': 2, 'SWAP': True, 'TMA': True}},
        '8192': {'BM': 64,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 3},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 8, 'num_warps': 4, 'num_stages': 4}},
        '65536': {'BM': 128,
            'gemm1': {'BN': 128, 'BK': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 3},
            'gemm2': {'BN': 128, 'BK': 128, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 4}}
    }
}
