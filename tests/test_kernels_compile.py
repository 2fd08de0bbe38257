"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

Compile errors that triton's CPU interpreter cannot see (constexpr misuse, unsupported ops, type
mismatches) otherwise surface only on a GPU. Triton lowers a kernel to PTX in-process, so CI
compiles launch variants with device-specific code (the atomics and L2 reads of the last-arrival
merge, FP8 dots and casts, programmatic dependent launch and L2 prefetch, whose instructions the
PTX is checked for) for ``GPUTarget("cuda", 90, 32)``. Runs in
a subprocess: under TRITON_INTERPRET=1 (how the kernel tests run here) kernels are not compilable.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

I64, I32, F32, BF16, FP8 = "*i64", "*i32", "*fp32", "*bf16", "*fp8e4nv"


def _variants():
    """(name, kernel, pointer/float argument types (others i32), constexprs, num_warps, num_stages,
    strings the PTX must contain)."""
    from eplb.kernels import decode_attention as da
    from eplb.kernels import linear_fp8, moe_triton, norm_rope, routing

    pdl = ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
    return [
        ("fp8_linear + PDL + weight prefetch", linear_fp8._fp8_linear_kernel,
         dict(x_ptr=FP8, xs_ptr=F32, w_ptr=FP8, ws_ptr=F32, y_ptr=BF16),
         dict(BM=16, BN=64, KSUB=2, GROUP_M=8, USE_PDL=True, PREFETCH=True, SWAP=False, TMA=False, SPLIT=1), 4, 4,
         pdl + ["prefetch.global.L2::evict_last"]),
        ("fp8_linear, transposed dots + TMA weight tiles", linear_fp8._fp8_linear_kernel,
         dict(x_ptr=FP8, xs_ptr=F32, w_ptr=FP8, w_desc="tensordesc<fp8e4nv[64, 128]>", ws_ptr=F32, y_ptr=BF16),
         dict(BM=16, BN=64, KSUB=2, GROUP_M=8, USE_PDL=False, PREFETCH=False, SWAP=True, TMA=True, SPLIT=1), 4, 4,
         ["wgmma", "cp.async.bulk.tensor"]),
        # split-K: float32 partials, the last-arrival sum (acquire/release atomics, L2 reads)
        ("fp8_linear split-K, transposed dots + TMA + PDL", linear_fp8._fp8_linear_kernel,
         dict(x_ptr=FP8, xs_ptr=F32, w_ptr=FP8, w_desc="tensordesc<fp8e4nv[128, 128]>", ws_ptr=F32, y_ptr=BF16,
              part_ptr=F32, cnt_ptr=I32),
         dict(BM=16, BN=128, KSUB=1, GROUP_M=8, USE_PDL=True, PREFETCH=False, SWAP=True, TMA=True, SPLIT=8), 4, 4,
         pdl + ["wgmma", "cp.async.bulk.tensor", "atom.global.gpu.acq_rel.add", "ld.global.cg"]),
        ("rms_norm + FP8 output + PDL", norm_rope._rms_norm_kernel,
         dict(x_ptr=BF16, res_ptr=BF16, w_ptr=BF16, out_ptr=BF16, rout_ptr=BF16, eps="fp32", q_ptr=FP8,
              qs_ptr=F32),
         dict(BR=1, LANES=128, ITERS=4, HAS_RES=True, EXACT=True, FMA=True, FP8=True, USE_PDL=True), 4, 3, pdl),
        ("router softmax + top-k", routing._softmax_topk_kernel,
         dict(logit_ptr=BF16, w_ptr=BF16, id_ptr=I64, map_ptr=I64, slot_ptr=I64, load_ptr=I64, n_real_ptr=I64,
              counts_ptr=I64, start_ptr=I64, sorted_ptr=I64, block_slot_ptr=I64, num_post_ptr=I64),
         dict(K=8, K_PAD=8, E_PAD=128, BR=16, RENORM=True, HAS_MAP=True, COUNT=True, REAL_PTR=True,
              USE_PDL=False, SORT=False, BM=16, S_PAD=16, J_PAD=2), 4, 3, []),
        ("router softmax + top-k, one row per one-warp program + PDL", routing._softmax_topk_kernel,
         dict(logit_ptr=BF16, w_ptr=BF16, id_ptr=I64, map_ptr=I64, slot_ptr=I64, load_ptr=I64, n_real_ptr=I64,
              counts_ptr=I64, start_ptr=I64, sorted_ptr=I64, block_slot_ptr=I64, num_post_ptr=I64),
         dict(K=8, K_PAD=8, E_PAD=128, BR=1, RENORM=True, HAS_MAP=True, COUNT=True, REAL_PTR=True,
              USE_PDL=True, SORT=False, BM=16, S_PAD=16, J_PAD=2), 1, 3, pdl),
        # ... that also sorts the pairs by slot for the MoE (atomics, barriers, L2 reads)
        ("router softmax + top-k + the MoE's pair sort", routing._softmax_topk_kernel,
         dict(logit_ptr=BF16, w_ptr=BF16, id_ptr=I64, map_ptr=I64, slot_ptr=I64, load_ptr=I64, n_real_ptr=I64,
              counts_ptr=I32, start_ptr=I32, sorted_ptr=I32, block_slot_ptr=I32, num_post_ptr=I32),
         dict(K=8, K_PAD=8, E_PAD=128, BR=32, RENORM=True, HAS_MAP=True, COUNT=True, REAL_PTR=True,
              USE_PDL=False, SORT=True, BM=16, S_PAD=128, J_PAD=16), 4, 3, ["atom.global", "bar.sync"]),
        # the router matmul in the tail's launch: dots, the last-arrival merge, the pair sort, PDL
        ("router matmul + softmax + top-k + pair sort + PDL", routing._router_kernel,
         dict(x_ptr=BF16, g_ptr=BF16, b_ptr=BF16, part_ptr=F32, cnt_ptr=I32, w_ptr=BF16, id_ptr=I64, map_ptr=I64,
              slot_ptr=I64, load_ptr=I64, n_real_ptr=I64, counts_ptr=I32, start_ptr=I32, sorted_ptr=I32,
              block_slot_ptr=I32, num_post_ptr=I32),
         dict(BT=16, EB=16, KS=512, KSPLIT=4, HAS_BIAS=True, PREC="tf32", K=8, K_PAD=8, E_PAD=128, BR=32,
              RENORM=True, HAS_MAP=True, COUNT=True, REAL_PTR=True, USE_PDL=True, SORT=True, BM=16, S_PAD=128,
              J_PAD=16), 8, 3,
         pdl + ["mma", "atom.global.gpu.acq_rel.add", "ld.global.cg"]),
        ("decode attention merged splits + FP8 + PDL", da._split_kernel,
         dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, slot_ptr=I64, ctx_ptr=I32, o_ptr=F32, lse_ptr=F32,
              qk_scale="fp32", q8_ptr=FP8, qs_ptr=F32, out_ptr=BF16, cnt_ptr=I32),
         dict(D=128, G_PAD=16, BLOCK_N=64, IEEE=False, DIRECT=False, FP8=True, MERGE=True, NS_PAD=4,
              USE_PDL=True), 4, 2, pdl),
        ("decode attention combine + FP8", da._combine_kernel,
         dict(o_ptr=F32, lse_ptr=F32, out_ptr=BF16, q8_ptr=FP8, qs_ptr=F32),
         dict(D=128, NS_PAD=128, FP8=True, USE_PDL=False), 4, 3, []),
        ("MoE one-program sort + PDL", moe_triton._align_small_kernel,
         dict(slot_ptr=I64, counts_ptr=I32, start_ptr=I32, sorted_ptr=I32, block_slot_ptr=I32, num_post_ptr=I32),
         dict(BM=16, N_PAD=256, S_PAD=128, J_PAD=16, USE_PDL=True), 8, 3, pdl),
        # SWAP (the FP8 table's decode tiles): BM = 16 pairs on the dot's N side, so the e4m3 dot
        # must lower to Hopper's wgmma
        ("MoE FP8 gate/up GEMM, transposed dots + PDL + expert prefetch", moe_triton._gemm1_kernel,
         dict(x_ptr=FP8, xs_ptr=F32, w_ptr=FP8, ws_ptr=F32, h_ptr=FP8, hs_ptr=F32, sorted_ptr=I32,
              block_slot_ptr=I32, num_post_ptr=I32, pair_slot_ptr=I64),
         dict(TOP_K=8, BM=16, BN=128, BK=128, GROUP_M=1, FP8=True, H_FP8=True, EVEN_K=True, USE_PDL=True,
              PREFETCH=True, LINE=128, SWAP=True, TMA=False), 4, 5, pdl + ["prefetch.global.L2::evict_last", "wgmma"]),
        # TMA (the FP8 table's decode tiles): weight tiles by the bulk tensor copy engine
        ("MoE FP8 gate/up GEMM, transposed dots + TMA weight tiles", moe_triton._gemm1_kernel,
         dict(x_ptr=FP8, xs_ptr=F32, w_ptr=FP8, w_desc="tensordesc<fp8e4nv[128, 128]>", ws_ptr=F32, h_ptr=FP8,
              hs_ptr=F32, sorted_ptr=I32, block_slot_ptr=I32, num_post_ptr=I32, pair_slot_ptr=I64),
         dict(TOP_K=8, BM=16, BN=128, BK=128, GROUP_M=1, FP8=True, H_FP8=True, EVEN_K=True, USE_PDL=False,
              PREFETCH=False, LINE=128, SWAP=True, TMA=True), 8, 3, ["wgmma", "cp.async.bulk.tensor"]),
        ("MoE FP8 down GEMM, transposed dots", moe_triton._gemm2_kernel,
         dict(h_ptr=FP8, hs_ptr=F32, w_ptr=FP8, ws_ptr=F32, y_ptr=BF16, weight_ptr=F32, sorted_ptr=I32,
              block_slot_ptr=I32, num_post_ptr=I32, pair_slot_ptr=I64),
         dict(BM=16, BN=64, BK=128, GROUP_M=1, FP8=True, H_FP8=True, EVEN_K=True, MUL_WEIGHT=True,
              USE_PDL=False, PREFETCH=False, LINE=128, SWAP=True, TMA=False, SUM_K=0), 4, 4, ["wgmma"]),
        # TMA weight tiles and the sum over k by the last-arriving pair (acquire/release atomics)
        ("MoE FP8 down GEMM, TMA weight tiles + sum over k", moe_triton._gemm2_kernel,
         dict(h_ptr=FP8, hs_ptr=F32, w_ptr=FP8, w_desc="tensordesc<fp8e4nv[128, 128]>", ws_ptr=F32, y_ptr=BF16,
              weight_ptr=F32, sorted_ptr=I32, block_slot_ptr=I32, num_post_ptr=I32, pair_slot_ptr=I64,
              out_ptr=BF16, cnt_ptr=I32),
         dict(BM=16, BN=128, BK=128, GROUP_M=1, FP8=True, H_FP8=True, EVEN_K=True, MUL_WEIGHT=True,
              USE_PDL=False, PREFETCH=False, LINE=128, SWAP=True, TMA=True, SUM_K=8), 4, 3,
         ["wgmma", "cp.async.bulk.tensor", "atom.global.gpu.acq_rel.add"]),
        ("MoE bf16 down GEMM + PDL + expert prefetch", moe_triton._gemm2_kernel,
         dict(h_ptr=BF16, hs_ptr=BF16, w_ptr=BF16, ws_ptr=BF16, y_ptr=BF16, weight_ptr=F32, sorted_ptr=I32,
              block_slot_ptr=I32, num_post_ptr=I32, pair_slot_ptr=I64),
         dict(BM=16, BN=64, BK=64, GROUP_M=1, FP8=False, H_FP8=False, EVEN_K=True, MUL_WEIGHT=True,
              USE_PDL=True, PREFETCH=True, LINE=64, SWAP=False, TMA=False, SUM_K=0), 4, 4,
         pdl + ["prefetch.global.L2::evict_last"]),
    ]


def _compile_all() -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for name, kernel, types, consts, warps, stages, expect in _variants():
        params = list(inspect.signature(kernel.fn).parameters)
        sig = {p: "constexpr" if p in consts else types.get(p, "i32") for p in params}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()})
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options=dict(num_warps=warps, num_stages=stages)).asm["ptx"]
            missing = [e for e in expect if e not in ptx]
            if not expect and "griddepcontrol" in ptx:
                missing.append("no griddepcontrol without USE_PDL")
            if missing:
                failed += 1
                print("FAILED", name, "PTX lacks", missing)
            else:
                print("compiled", name)
        except Exception as exc:  # noqa: BLE001 (report every kernel, then fail)
            failed += 1
            print("FAILED", name, type(exc).__name__, str(exc)[:2000])
    return failed


def test_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                           env.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.count("compiled") == len(_variants()), r.stdout + r.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(1 if _compile_all() else 0)
