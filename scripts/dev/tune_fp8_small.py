"""Dev: MoE tile configs at decode sizes, with and without transposed dots (SWAP: weight columns as
the MMA's M side, so that an FP8 dot of a few pairs per expert can use Hopper's wgmma instead of
fp16 mma.sync). Coordinate descent per BM (bench/gpu.py's search_tiles), experts-only CUDA
graph time (bench/gpu.py's graph_time; weights stream from HBM: 128 experts, 8 input sets).

    python scripts/dev/tune_fp8_small.py [--dtypes fp8,bf16] [--tokens 1,16,32,64,128,256] [--out F]
        [--stages 3,4,5] [--warps 4] [--swap-only] [--bms 16,32] [--tma]

Prints the table entry before and the best found per token count, with the read rate of the
touched expert bytes against the reduction read rate; --out writes {dtype: {pairs: config}} for
bench/full_size.py --tile-table and tile_table.TABLE.
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels.moe_triton import get_config  # noqa: E402


def c(bn, w, s, swap, bk=128, tma=False):
    cfg = {"BN": bn, "BK": bk, "GROUP_M": 1, "num_warps": w, "num_stages": s, "SWAP": swap}
    return dict(cfg, TMA=True) if tma else cfg


def candidates(fp8: bool, stages=(3, 4, 5), warps=(4,), swaps=(False, True), tma=False):
    if tma:  # bulk-copy weight tiles: transposed FP8 tiles only
        g = [c(bn, w, s, True, 128, True) for bn, w, s in itertools.product((64, 128), warps, stages)]
        return g, list(g)
    bks = (128,) if fp8 else (64, 128)
    g1 = [c(bn, w, s, sw, bk) for bn, w, s, sw, bk in itertools.product((64, 128), warps, stages, swaps, bks)]
    if False in swaps:
        g1 += [c(32, 4, 4, False, bk) for bk in bks]
    g2 = [c(bn, w, s, sw, bk) for bn, w, s, sw, bk in itertools.product((64, 128), warps, stages, swaps, bks)]
    return g1, g2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp8")
    ap.add_argument("--tokens", default="1,16,32,64,128,256")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stages", default="3,4,5", help="pipeline depths to try")
    ap.add_argument("--warps", default="4", help="warp counts to try")
    ap.add_argument("--swap-only", action="store_true", help="only transposed-dot candidates")
    ap.add_argument("--tma", action="store_true", help="weight tiles through tensor descriptors (TMA)")
    ap.add_argument("--bms", default=None, help="row blocks to try (default 16, and 32 above 16 tokens)")
    args = ap.parse_args()
    read_bps = gpu.ceilings()["reduction_read_GBps"] * 1e9
    print(f"{torch.cuda.get_device_name()}: reduction read {read_bps / 1e9:.0f} GB/s", flush=True)
    layer = gpu.Layer()
    found: dict = {}
    with torch.no_grad():
        for key in args.dtypes.split(","):
            fp8 = key == "fp8"
            wargs = (layer.q13, layer.q2) if fp8 else (layer.w13, layer.w2)
            kw = {"w13_scale": layer.s13, "w2_scale": layer.s2} if fp8 else {}
            per_expert = 3 * gpu.H * gpu.I * (1 if fp8 else 2)
            g1s, g2s = candidates(fp8, tuple(int(v) for v in args.stages.split(",")),
                                  tuple(int(v) for v in args.warps.split(",")),
                                  (True,) if args.swap_only else (False, True), tma=args.tma and fp8)
            found[key] = {}
            for t in (int(v) for v in args.tokens.split(",")):
                xs = [torch.randn(t, gpu.H, device="cuda", dtype=torch.bfloat16) for _ in range(gpu.NSETS)]
                routes = [layer.route(x) for x in xs]
                distinct = sum(len(torch.unique(r[0])) for r in routes) / len(routes)

                def run(cfg, xs=xs, routes=routes, wargs=wargs, kw=kw):
                    return gpu.graph_time(xs, routes, wargs, dict(kw, config=cfg))

                def frac(sec, distinct=distinct, per_expert=per_expert):
                    return distinct * per_expert / sec / read_bps

                base = run(get_config(t * gpu.K, fp8))
                check = gpu.moe_checker(xs[0], routes[0], wargs, kw)
                best = None
                bms = tuple(int(v) for v in args.bms.split(",")) if args.bms else ((16,) if t <= 16 else (16, 32))
                for bm in bms:
                    sec, cur = gpu.search_tiles(run, bm, g1s, g2s, f"fail {key} t={t}", check)
                    if best is None or sec < best[0]:
                        best = (sec, cur)
                    # the same tiles without TMA (with --tma) or else without SWAP, for the A/B
                    off = {"TMA": False} if args.tma else {"SWAP": False}
                    plain = {"BM": bm, "gemm1": dict(cur["gemm1"], **off), "gemm2": dict(cur["gemm2"], **off)}
                    psec = run(plain)
                    print(f"  {key} t={t} BM={bm}: {sec * 1e6:.1f} us ({frac(sec):.2f} of read) {cur}; "
                          f"same tiles without {'TMA' if args.tma else 'SWAP'} {psec * 1e6:.1f} us", flush=True)
                print(f"{key} t={t} ({distinct:.0f} experts): table {base * 1e6:.1f} us ({frac(base):.2f}), "
                      f"best {best[0] * 1e6:.1f} us ({frac(best[0]):.2f})", flush=True)
                found[key][str(t * gpu.K)] = best[1]
                if args.out:  # after every size, so that a run cut short still leaves its findings
                    with open(args.out, "w") as f:
                        json.dump(found, f, indent=1)


if __name__ == "__main__":
    main()
