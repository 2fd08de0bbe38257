"""Dev: block-FP8 dense linear tiles at decode sizes, Qwen3-30B-A3B's attention projections.

For each shape (qkv: 2048 -> 5120, o: 4096 -> 2048) and M: the shipped ``pick_config``, the
pre-change config (BN narrowed to >= 128 programs, one 128-block per iteration), a grid of
candidates, and bf16 F.linear on the dequantized weight; microseconds from a CUDA graph of
``SETS`` calls over distinct weight copies (so weights stream from HBM, as in a 48-layer step),
and the weight-byte floor at the copy rate measured in the same run.
    PYTHONPATH=src python3 scripts/dev/tune_fp8_linear.py [--out results.json] [--ms 1,32] [--swap]
--swap adds transposed-dot tiles (SWAP, BN >= 64) with pointer and bulk-copy (TMA) weight loads to
the candidates, and reports the best plain and the best SWAP tile apart.
--split sweeps split-K instead (SPLIT 1, 2, 4, 8 over SWAP/TMA tiles, plain ones too above 32 rows).
"""
import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels import quantize_block_fp8  # noqa: E402
from eplb.kernels.linear_fp8 import fp8_linear, pick_config  # noqa: E402

SETS = 16
SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096)}
MS = (1, 16, 32, 64, 128, 256)


def graph_us(call):
    return gpu.graph_time_fn(call, sets=SETS) * 1e6


def old_config(m, n):
    bm = 16 if m <= 16 else 64
    bn = 128
    if m <= 64:
        while bn > 16 and -(-m // bm) * -(-n // bn) < 128:
            bn //= 2
    return dict(BM=bm, BN=bn, KSUB=1, num_warps=4, num_stages=3)


def grid_candidates(m, k, swap):
    """Plain tiles at M rows, K columns (BM, BN, KSUB, stages), with ``swap`` also their
    transposed-dot versions, pointer and TMA loads, for BN >= 64."""
    small = m <= 64
    bms = (16,) if m <= 16 else (16, 32 if m <= 32 else 64) if small else (32, 64)
    out = []
    for bm, bn, ksub, st in itertools.product(bms, (16, 32, 64, 128) if small else (32, 64, 128),
                                              (2, 4, 8), (3, 4)):
        if (k // 128) % ksub:
            continue
        variants = [{}]
        if swap and bn >= 64:
            variants += [{"SWAP": True}, {"SWAP": True, "TMA": True}]
        out += [dict(BM=bm, BN=bn, KSUB=ksub, num_warps=4, num_stages=st, **extra) for extra in variants]
    return out


def split_candidates(m, k):
    """Split-K tiles at M rows, K columns: SWAP/TMA (plain too above 32 rows) x SPLIT 1-8, 4 stages
    (the decode tiles' best depth in the sweeps before)."""
    bms = (16,) if m <= 16 else (16, 32) if m <= 32 else (16, 64)
    out = []
    for bm, bn, ksub, st, split in itertools.product(bms, (64, 128), (1, 2, 4), (4,), (1, 2, 4, 8)):
        if (k // 128) % (ksub * split):
            continue
        out.append(dict(BM=bm, BN=bn, KSUB=ksub, num_warps=4, num_stages=st, SWAP=True, TMA=True, SPLIT=split))
        if m > 32 and bm == 64:
            out.append(dict(BM=bm, BN=bn, KSUB=ksub, num_warps=4, num_stages=st, SPLIT=split))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--swap", action="store_true", help="also transposed-dot tiles, pointer and TMA loads")
    ap.add_argument("--split", action="store_true", help="split-K tiles (SPLIT 1-8) instead of the plain grid")
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    copy_gbps = gpu.ceilings()["copy_GBps_read_plus_write"]
    rows = []
    for name, (n, k) in SHAPES.items():
        ws = [quantize_block_fp8(torch.randn(n, k, device="cuda") / k**0.5) for _ in range(SETS)]
        wb = [(q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.bfloat16)
              for q, s in ws]
        floor_us = n * k / (copy_gbps * 1e9) * 1e6
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
            res = {}

            want = fp8_linear(xs[0], ws[0][0], ws[0][1], config=old_config(m, n))

            def run(cfg):
                # a tile whose output is wrong must never win (SWAP: another MMA, bf16 rounding apart)
                err = gpu.rel(fp8_linear(xs[0], ws[0][0], ws[0][1], config=cfg), want)
                if not err < gpu.TILE_TOL:
                    raise ValueError(f"WRONG OUTPUT (relative error {err:.3g})")
                return graph_us(lambda j: fp8_linear(xs[j], ws[j][0], ws[j][1], config=cfg))

            res["shipped"] = (run(pick_config(m, n, k)), pick_config(m, n, k))
            res["before"] = (run(old_config(m, n)), old_config(m, n))
            res["bf16_F.linear"] = (graph_us(lambda j: F.linear(xs[j], wb[j])), None)
            cands = []
            for cfg in split_candidates(m, k) if args.split else grid_candidates(m, k, args.swap):
                try:
                    cands.append((run(cfg), cfg))
                except Exception as exc:  # noqa: BLE001 (out of shared memory, wrong output)
                    print(f"  fail {cfg}: {type(exc).__name__} {exc}"[:160], flush=True)
            cands.sort(key=lambda c: c[0])
            res["best"] = cands[0]
            if args.swap:
                plain = [c for c in cands if not c[1].get("SWAP")]
                swapped = [c for c in cands if c[1].get("SWAP")]
                if plain and swapped:
                    res["best_plain"], res["best_swap"] = plain[0], swapped[0]
            row = {"shape": name, "n": n, "k": k, "m": m, "floor_us": floor_us,
                   **{f"{key}_us": v[0] for key, v in res.items()},
                   "best_config": cands[0][1], "top5": [[round(t, 2), c] for t, c in cands[:5]]}
            rows.append(row)
            print(f"{name:3s} M={m:4d} floor {floor_us:6.2f}  shipped {res['shipped'][0]:6.2f}  before "
                  f"{res['before'][0]:6.2f}  bf16 {res['bf16_F.linear'][0]:6.2f}  best {cands[0][0]:6.2f} "
                  f"{cands[0][1]}", flush=True)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": copy_gbps,
           "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
