"""Dev: FP8 MoE tile configs at decode sizes (16/32/64 tokens), incl. BM=64 (native e4m3 wgmma;
below 64 rows triton lowers e4m3 dots to fp16 mma.sync). Weights stream from HBM (128 experts)."""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels.moe_triton import get_config  # noqa: E402

layer = gpu.Layer()
K = gpu.K


def c(bn, w, s):
    return {"BN": bn, "BK": 128, "GROUP_M": 1, "num_warps": w, "num_stages": s}


for t in (16, 32, 64, 128):
    xs = [torch.randn(t, gpu.H, device="cuda", dtype=torch.bfloat16) for _ in range(gpu.NSETS)]
    routes = [layer.route(x) for x in xs]
    kw = {"w13_scale": layer.s13, "w2_scale": layer.s2}
    wargs = (layer.q13, layer.q2)
    base = gpu.graph_time(xs, routes, wargs, dict(kw, config=get_config(t * K, True)))
    res = []
    for bm, g1, g2 in itertools.product((16, 32, 64), (c(32, 4, 4), c(64, 4, 3), c(128, 4, 3), c(128, 8, 3)),
                                        (c(64, 4, 3), c(128, 4, 3), c(128, 4, 4))):
        cfg = {"BM": bm, "gemm1": g1, "gemm2": g2}
        try:
            res.append((gpu.graph_time(xs, routes, wargs, dict(kw, config=cfg)), cfg))
        except Exception as exc:  # noqa: BLE001
            print("fail", cfg, type(exc).__name__, flush=True)
    res.sort(key=lambda r: r[0])
    print(f"t={t}: table {base * 1e3:.4f} ms; best:", flush=True)
    for sec, cfg in res[:4]:
        g1 = cfg["gemm1"]
        print(f"   {sec * 1e3:.4f} ms  BM={cfg['BM']} g1={g1['BN']}/w{g1['num_warps']}/s{g1['num_stages']} "
              f"g2={cfg['gemm2']['BN']}/w{cfg['gemm2']['num_warps']}/s{cfg['gemm2']['num_stages']}", flush=True)
