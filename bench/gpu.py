"""GPU benchmark of the fused MoE kernels against the hardware's ceilings and other MoE paths.

One command on a CUDA machine:  python bench/gpu.py [--tune] [--out DIR]
  ceilings   read rate of a >= 1 GiB reduction, device copy, bf16 matmul, FP8 matmul (8192^3)
  moe        Qwen3-30B-A3B's MoE layer (hidden 2048, 128 experts, top-8, intermediate 768) at
             1..8192 tokens: ours bf16/FP8 (Triton), the plain torch path, transformers'
             Qwen3MoeSparseMoeBlock with _experts_implementation="grouped_mm", same weights;
             each layer call = router + top-k + experts. Read rate on the expert bytes touched
             (distinct experts hit, read once) over the reduction read rate; TFLOP/s over the
             matmul ceiling of the weights' dtype.
  graph      our bf16/FP8 expert compute at 1 token replayed from a CUDA graph
  --e2e      then bench/gpu_e2e.py: our engine vs transformers generate, end to end
  --tune     first sweeps tile configs per token count and uses the best (prints a TABLE for
             src/eplb/kernels/tile_table.py and writes tile_table-<device>.json)
Times: CUDA events after warm-up, median of repeats, inputs rotated over 8 sets so that repeated
calls do not run out of L2. Writes bench/results/gpu-<device>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from eplb.kernels import moe_torch, quantize_block_fp8  # noqa: E402

H, E, K, I = 2048, 128, 8, 768
TOKENS = [1, 16, 64, 256, 1024, 8192]
NSETS = 8


def timed(fn, reps: int = 50, warmup: int = 5) -> float:
    """Median seconds of fn() over reps, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def ceilings() -> dict:
    dev = "cuda"
    out = {}
    n = 3 << 29  # 1.5 Gi bf16 elements = 3 GiB
    x = torch.randn(n, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: x.sum(dtype=torch.float32), reps=20)
    out["reduction_read_GBps"] = x.numel() * 2 / t / 1e9
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), reps=20)
    out["copy_GBps_read_plus_write"] = 2 * x.numel() * 2 / t / 1e9
    x = y = None  # free the 6 GiB before the matmuls
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, reps=20)
    out["bf16_matmul_TFLOPs"] = 2 * m**3 / t / 1e12
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major second operand
    one = torch.ones((), device=dev)
    t = timed(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), reps=20)
    out["fp8_matmul_TFLOPs"] = 2 * m**3 / t / 1e12
    return out


class Layer:
    """Random Qwen3-30B-A3B-shaped MoE layer: router + experts, bf16 and block-FP8 copies."""

    def __init__(self, dev="cuda"):
        g = torch.Generator(device=dev).manual_seed(0)
        self.wg = (torch.randn(E, H, device=dev, generator=g) / H**0.5).to(torch.bfloat16)
        self.w13 = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H**0.5).to(torch.bfloat16)
        self.w2 = (torch.randn(E, H, I, device=dev, generator=g) / I**0.5).to(torch.bfloat16)
        self.q13, self.s13 = quantize_block_fp8(self.w13)
        self.q2, self.s2 = quantize_block_fp8(self.w2)

    def route(self, x):
        """Plain torch routing (as eplb.model.moe and transformers do it)."""
        probs = F.softmax(F.linear(x, self.wg), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, K, dim=-1)
        return ids, (w / w.sum(-1, keepdim=True)).to(x.dtype)

    def route_fused(self, x):
        """Router matmul + our one-launch softmax/top-k/renormalise."""
        from eplb.kernels import softmax_topk

        w, ids = softmax_topk(F.linear(x, self.wg), K, True)
        return ids, w


def hf_block(layer: Layer):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K,
                         moe_intermediate_size=I, norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    blk = Qwen3MoeSparseMoeBlock(cfg).to("cuda", torch.bfloat16)
    with torch.no_grad():
        blk.gate.weight.copy_(layer.wg)
        blk.experts.gate_up_proj.copy_(layer.w13)
        blk.experts.down_proj.copy_(layer.w2)
    return blk


def torch_path(x, ids, w, layer: Layer):
    """The engine's plain torch path (eplb.model.moe: expert_forward + combine), or our
    reference loop when the engine module is not there."""
    try:
        from eplb.model.moe import combine, expert_forward
    except ImportError:
        return moe_torch(x, ids, w, layer.w13, layer.w2)
    t, k = ids.shape
    y = expert_forward(x.repeat_interleave(k, dim=0), ids.reshape(-1), layer.w13, layer.w2)
    return combine(y.view(t, k, -1), w)


def hf_call(blk, x):
    out = blk(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def moe_bench(ceil: dict) -> list[dict]:
    from eplb.kernels import fused_moe

    layer = Layer()
    blk = hf_block(layer)
    rows = []
    for t in TOKENS:
        xs = [torch.randn(t, H, device="cuda", dtype=torch.bfloat16) for _ in range(NSETS)]
        routes = [layer.route(x) for x in xs]
        distinct = statistics.mean(len(torch.unique(r[0])) for r in routes)
        flops = 2 * t * K * 3 * H * I
        bytes_bf16 = distinct * 3 * H * I * 2
        bytes_fp8 = distinct * (3 * H * I + 4 * (3 * H * I) // (128 * 128))
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % NSETS
            return it["i"]

        impls = {
            "ours_bf16": (lambda: (lambda j: fused_moe(xs[j], *layer.route_fused(xs[j]), layer.w13, layer.w2))(
                nxt()), bytes_bf16, "bf16"),
            "ours_fp8": (lambda: (lambda j: fused_moe(xs[j], *layer.route_fused(xs[j]), layer.q13, layer.q2,
                                                      w13_scale=layer.s13, w2_scale=layer.s2))(nxt()),
                         bytes_fp8, "fp8"),
            "hf_grouped_mm": (lambda: hf_call(blk, xs[nxt()]), bytes_bf16, "bf16"),
        }
        # eager experts only (routing given): separates our launches from the router's
        impls["ours_bf16_experts"] = (
            lambda: (lambda j: fused_moe(xs[j], routes[j][0], routes[j][1], layer.w13, layer.w2))(nxt()),
            bytes_bf16, "bf16")
        if t <= 1024:  # the per-expert python loop gets slow; enough to show the gap
            impls["torch_plain"] = (lambda: (lambda j: torch_path(xs[j], *layer.route(xs[j]), layer))(nxt()),
                                    bytes_bf16, "bf16")
        # correctness on set 0 against the plain torch path (float32 reference)
        ids, w = routes[0]
        ref = moe_torch(xs[0].float(), ids, w.float(), layer.w13.float(), layer.w2.float())
        errs = {
            "ours_bf16": rel(fused_moe(xs[0], ids, w, layer.w13, layer.w2), ref),
            "ours_fp8": rel(fused_moe(xs[0], ids, w, layer.q13, layer.q2, w13_scale=layer.s13, w2_scale=layer.s2), ref),
            "hf_grouped_mm": rel(hf_call(blk, xs[0]), ref),
        }
        for name, (fn, nbytes, kind) in impls.items():
            try:
                with torch.no_grad():
                    sec = timed(fn, reps=30 if t >= 1024 else 60)
            except Exception as exc:  # keep the other rows
                rows.append({"tokens": t, "impl": name, "error": repr(exc)[:300]})
                continue
            mm = ceil["bf16_matmul_TFLOPs"] if kind == "bf16" else ceil["fp8_matmul_TFLOPs"]
            rows.append({
                "tokens": t, "impl": name, "ms": sec * 1e3,
                "distinct_experts": distinct,
                "read_GBps": nbytes / sec / 1e9,
                "read_frac": nbytes / sec / 1e9 / ceil["reduction_read_GBps"],
                "TFLOPs": flops / sec / 1e12,
                "mm_frac": flops / sec / 1e12 / mm,
                "rel_err_vs_fp32": errs.get(name),
            })
            r = rows[-1]
            print(f"  {t:5d} {name:14s} {r['ms']:8.3f} ms  {r['read_GBps']:7.0f} GB/s ({r['read_frac']:.2f})"
                  f"  {r['TFLOPs']:6.1f} TFLOP/s ({r['mm_frac']:.2f})", flush=True)
        # the whole layer (router matmul, fused top-k, experts) replayed from a CUDA graph: the
        # GPU time without Python launch overhead (what a graph-captured decode step would see)
        if True:
            for name, wargs, kw, nbytes in (
                    ("ours_bf16_graph", (layer.w13, layer.w2), {}, bytes_bf16),
                    ("ours_fp8_graph", (layer.q13, layer.q2), {"w13_scale": layer.s13, "w2_scale": layer.s2},
                     bytes_fp8)):
                try:
                    sec = graph_time_fn(lambda j: fused_moe(xs[j], *layer.route_fused(xs[j]), *wargs, **kw))
                    mm = ceil["bf16_matmul_TFLOPs"] if "bf16" in name else ceil["fp8_matmul_TFLOPs"]
                    rows.append({"tokens": t, "impl": name, "ms": sec * 1e3, "read_GBps": nbytes / sec / 1e9,
                                 "read_frac": nbytes / sec / 1e9 / ceil["reduction_read_GBps"],
                                 "TFLOPs": flops / sec / 1e12, "mm_frac": flops / sec / 1e12 / mm,
                                 "note": "whole layer (router, fused top-k, experts), CUDA graph replay"})
                    r = rows[-1]
                    print(f"  {t:5d} {name:14s} {r['ms']:8.3f} ms  {r['read_GBps']:7.0f} GB/s ({r['read_frac']:.2f})"
                          f"  {r['TFLOPs']:6.1f} TFLOP/s ({r['mm_frac']:.2f})", flush=True)
                except Exception as exc:
                    rows.append({"tokens": t, "impl": name, "error": repr(exc)[:300]})
    return rows


def graph_time(xs, routes, wargs, kw, reps: int = 30) -> float:
    """Experts only (routing given), per call, from a CUDA graph of NSETS calls."""
    from eplb.kernels import fused_moe

    return graph_time_fn(lambda j: fused_moe(xs[j], routes[j][0], routes[j][1], *wargs, **kw), reps)


def graph_time_fn(call, reps: int = 30, sets: int = NSETS) -> float:
    """Seconds per call(j), from a CUDA graph that calls it for j = 0..sets-1."""
    def body():
        for j in range(sets):
            call(j)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return timed(g.replay, reps=reps) / sets


# ----------------------------------------------------------------------------- tuning

def _cands(t: int, fp8: bool):
    def c(bn, bk, g, w, s, swap=False):
        return {"BN": bn, "BK": 128 if fp8 else bk, "GROUP_M": g, "num_warps": w, "num_stages": s, "SWAP": swap}
    if fp8 and t <= 256:
        # a few pairs per expert: transposed dots (SWAP) let the FP8 dot use wgmma
        bms = [16] if t <= 16 else [16, 32]
        g1 = [c(bn, 128, 1, 4, s, sw) for bn in (64, 128) for s in (3, 4) for sw in (False, True)]
        g2 = [c(bn, 128, 1, 4, s, sw) for bn in (64, 128) for s in (3, 4) for sw in (False, True)]
        return bms, g1, g2
    if t <= 16:
        bms = [16]
        g1 = [c(32, 128, 1, 4, 4), c(64, 128, 1, 4, 4), c(32, 256, 1, 4, 3), c(128, 128, 1, 4, 3)]
        g2 = [c(32, 128, 1, 4, 4), c(64, 128, 1, 4, 4), c(128, 128, 1, 4, 3), c(64, 256, 1, 4, 3)]
    elif t <= 256:
        bms = [16, 32] if t < 256 else [16, 32, 64]
        g1 = [c(32, 128, 1, 4, 4), c(64, 128, 1, 4, 3), c(128, 128, 1, 4, 3), c(64, 64, 1, 4, 5)]
        g2 = [c(64, 128, 1, 4, 3), c(128, 128, 1, 4, 3), c(128, 64, 1, 4, 4), c(256, 64, 1, 8, 3)]
    else:
        bms = [64, 128]
        g1 = [c(64, 64, 8, 4, 4), c(128, 64, 8, 8, 3), c(64, 128, 8, 4, 3), c(128, 128, 8, 8, 3)]
        g2 = [c(128, 64, 8, 4, 4), c(128, 64, 8, 8, 4), c(256, 64, 8, 8, 3), c(128, 128, 8, 8, 3)]
        return bms, g1, g2
    # bf16 dots of BM < 64 rows also lower to mma.sync: try each candidate transposed too
    return bms, g1 + [dict(x, SWAP=True) for x in g1 if x["BN"] >= 64], \
        g2 + [dict(x, SWAP=True) for x in g2 if x["BN"] >= 64]


# a tile's output against the reference tile's: SWAP tiles run another MMA (bf16 rounding apart);
# an indexing error is O(1)
TILE_TOL = 1e-2
# an FP8 MoE tile's output against the float32 emulation of the FP8 path (moe_torch, act_quant):
# tiles round the intermediate h differently (128-wide gate/up tiles quantize it from float32, the
# others store it in bf16 first), so two right tiles may differ by more than TILE_TOL from each
# other; the GPU tests hold every tile within this of the emulation
FP8_TILE_TOL = 2e-2


def moe_checker(x, route, wargs, kw):
    """-> check(cfg): (the relative error of fused_moe with tile ``cfg``, the tolerance it must be
    below): bf16 against the shipped tiles' output within ``TILE_TOL``, FP8 (``kw`` has the weight
    scales) against the emulated FP8 path within ``FP8_TILE_TOL``."""
    from eplb import kernels
    from eplb.model.checkpoint import dequantize_block_fp8

    if "w13_scale" in kw:
        d13 = dequantize_block_fp8(wargs[0], kw["w13_scale"], [128, 128])
        d2 = dequantize_block_fp8(wargs[1], kw["w2_scale"], [128, 128])
        want = kernels.moe_torch(x.float(), route[0], route[1].float(), d13, d2, act_quant=True)
        del d13, d2
        tol = FP8_TILE_TOL
    else:
        want, tol = kernels.fused_moe(x, route[0], route[1], *wargs, **kw), TILE_TOL
    return lambda cfg: (rel(kernels.fused_moe(x, route[0], route[1], *wargs, **dict(kw, config=cfg)), want), tol)


def search_tiles(run, bm: int, g1s: list[dict], g2s: list[dict], label: str,
                 check=None) -> tuple[float, dict]:
    """Coordinate search at row block ``bm``: the best gemm1 candidate with gemm2 at its first,
    then the best gemm2 with that gemm1. ``run(cfg)`` -> seconds; a candidate that fails to
    compile or run, or whose output is off (``check(cfg)`` -> its relative error, the tolerance
    it must be below), is reported and skipped.
    -> (seconds, config)."""
    cur = {"BM": bm, "gemm1": g1s[0], "gemm2": g2s[0]}
    for part, cands in (("gemm1", g1s), ("gemm2", g2s)):
        res = []
        for cand in cands:
            cfg = dict(cur, **{part: cand})
            try:
                err, tol = check(cfg) if check is not None else (0.0, TILE_TOL)
                if not err < tol:
                    print(f"   {label} BM={bm} {part} {cand}: WRONG OUTPUT (relative error {err:.3g} >= {tol:g})",
                          flush=True)
                    continue
                res.append((run(cfg), cand))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                print(f"   {label} BM={bm} {part} {cand}: {type(exc).__name__}", flush=True)
        if res:
            cur = dict(cur, **{part: min(res, key=lambda r: r[0])[1]})
    return run(cur), cur


@torch.no_grad()
def tune(tokens=TOKENS) -> dict:
    from eplb.kernels.tile_table import TABLE

    layer = Layer()
    out = {"bf16": {}, "fp8": {}}
    for fp8 in (False, True):
        key = "fp8" if fp8 else "bf16"
        wargs = (layer.q13, layer.q2) if fp8 else (layer.w13, layer.w2)
        kw = {"w13_scale": layer.s13, "w2_scale": layer.s2} if fp8 else {}
        for t in tokens:
            xs = [torch.randn(t, H, device="cuda", dtype=torch.bfloat16) for _ in range(NSETS)]
            routes = [layer.route(x) for x in xs]
            def run(cfg):
                # CUDA-graph replay of NSETS calls: GPU time, not Python launch overhead
                return graph_time(xs, routes, wargs, dict(kw, config=cfg))

            bms, g1s, g2s = _cands(t, fp8)
            check = moe_checker(xs[0], routes[0], wargs, kw)
            best = min((search_tiles(run, bm, g1s, g2s, f"tune {key} t={t}", check) for bm in bms),
                       key=lambda r: r[0])
            n_pairs = str(t * K)
            default = TABLE[key].get(n_pairs)
            dsec = run(default) if default else None
            print(f"  tune {key} t={t}: best {best[0]*1e3:.3f} ms {best[1]}  (table before: "
                  f"{dsec*1e3 if dsec else float('nan'):.3f} ms)", flush=True)
            out[key][n_pairs] = best[1]
    return out


@torch.no_grad()
def dense_bench(ceil: dict) -> list[dict]:
    """Block-FP8 linear vs bf16 F.linear at an attention projection's shape (2048 -> 4096)."""
    from eplb.kernels import fp8_linear

    n, k = 4096, 2048
    w = torch.randn(n, k, device="cuda") / k**0.5
    q, s = quantize_block_fp8(w)
    wb = w.to(torch.bfloat16)
    rows = []
    for m in (1, 64, 8192):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(NSETS)]
        for name, fn in (("bf16_F.linear", lambda j: F.linear(xs[j], wb)),
                         ("ours_fp8_linear", lambda j: fp8_linear(xs[j], q, s))):
            sec = graph_time_fn(fn)
            fl = 2 * m * n * k / sec / 1e12
            rows.append({"m": m, "impl": name, "us": sec * 1e6, "TFLOPs": fl})
            print(f"  dense m={m:5d} {name:16s} {sec*1e6:8.1f} us  {fl:6.1f} TFLOP/s (graph)", flush=True)
    return rows


def kernel_resources() -> list[dict]:
    """Registers / spills / shared memory of every compiled GEMM variant (Triton's report)."""
    from eplb.kernels import moe_triton

    out = []
    for name in ("_gemm1_kernel", "_gemm2_kernel"):
        fn = getattr(moe_triton, name)
        try:
            for cache in fn.device_caches.values():
                for key, kern in cache[0].items():
                    kern._init_handles()
                    md = kern.metadata
                    out.append({"kernel": name, "num_warps": md.num_warps, "num_stages": md.num_stages,
                                "n_regs": kern.n_regs, "n_spills": kern.n_spills, "shared": md.shared,
                                "key": str(key)[:200]})
        except Exception as exc:
            out.append({"kernel": name, "error": repr(exc)[:200]})
    spilling = [r for r in out if r.get("n_spills")]
    print(f"compiled GEMM variants: {len(out)}, with spills: "
          + ", ".join(f"{r['kernel']} w{r['num_warps']} s{r['num_stages']} regs {r['n_regs']} spills {r['n_spills']}"
                      for r in spilling[:8]), flush=True)
    return out


def markdown(res: dict) -> str:
    """The docs/gpu.md tables from a results JSON."""
    c = res["ceilings"]
    lines = [f"Device: {res['device']}, torch {res['torch']}, triton {res['triton']}, transformers "
             f"{res['transformers']}, {res['date']}.", "",
             "| ceiling | measured |", "| --- | --- |",
             f"| read rate, 3 GiB bf16 sum | {c['reduction_read_GBps']:.0f} GB/s |",
             f"| device copy (read + write) | {c['copy_GBps_read_plus_write']:.0f} GB/s |",
             f"| bf16 matmul 8192^3 | {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s |",
             f"| FP8 matmul 8192^3 (torch._scaled_mm) | {c['fp8_matmul_TFLOPs']:.0f} TFLOP/s |", "",
             "MoE layer at Qwen3-30B-A3B's shape (router + top-k + experts; `_graph` rows: the same "
             "replayed from a CUDA graph; `_experts`: routing given, eager). ms (median); read rate on "
             "the expert bytes touched / reduction read rate; TFLOP/s / matmul ceiling of the dtype.", "",
             "| tokens | impl | ms | read frac | TFLOP/s | mm frac |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res.get("moe", []):
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['impl']} | error | | | |")
            continue
        tf = f"{r['TFLOPs']:.1f}" if "TFLOPs" in r else ""
        mf = f"{r['mm_frac']:.2f}" if "mm_frac" in r else ""
        lines.append(f"| {r['tokens']} | {r['impl']} | {r['ms']:.3f} | {r['read_frac']:.2f} | {tf} | {mf} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        with open(sys.argv[2]) as f:
            print(markdown(json.load(f)))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="also run bench/gpu_e2e.py (engine vs generate)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_e2e

    gpu_e2e.add_arguments(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    dev_slug = name.replace("NVIDIA ", "").replace(" ", "-").lower()
    import transformers
    import triton

    res = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shape": {"hidden": H, "experts": E, "top_k": K, "intermediate": I}}
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        table = tune()
        from eplb.kernels import tile_table

        tile_table.TABLE.update(table)  # the bench below uses the tuned entries
        with open(os.path.join(args.out, f"tile_table-{dev_slug}.json"), "w") as f:
            json.dump(table, f, indent=1)
        res["tuned_table"] = table
    print("ceilings:", flush=True)
    res["ceilings"] = ceilings()
    for k, v in res["ceilings"].items():
        print(f"  {k:28s} {v:9.1f}", flush=True)
    res["dense"] = dense_bench(res["ceilings"])
    if not args.skip_moe:
        print("moe layer (tokens impl ms read-rate TFLOP/s, fractions of ceilings):", flush=True)
        try:
            res["moe"] = moe_bench(res["ceilings"])
        except Exception:
            traceback.print_exc()
    res["kernel_resources"] = kernel_resources()
    path = os.path.join(args.out, f"gpu-{dev_slug}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)
    if args.e2e:
        del res
        torch.cuda.empty_cache()
        return gpu_e2e.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
