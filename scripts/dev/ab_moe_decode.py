"""Dev: A/B of the decode-size MoE launch choices on one Qwen3-30B-A3B-shaped layer (CUDA-graph
timing, microseconds per call): the one-program slot sort vs the count + scatter launches, and
the k-sum's tile width, at 1-256 tokens.
    PYTHONPATH=src python3 scripts/dev/ab_moe_decode.py"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels import moe_triton  # noqa: E402

layer = gpu.Layer()
VARIANTS = {"shipped": {}, "sort_launches": {"SMALL_ALIGN_MAX_PAIRS": 128}, "sum_256": {"SUM_BLOCK_H": 256},
            "sum_512": {"SUM_BLOCK_H": 512}}
rows = []
for fp8 in (True, False):
    kw = {"w13_scale": layer.s13, "w2_scale": layer.s2} if fp8 else {}
    wargs = (layer.q13, layer.q2) if fp8 else (layer.w13, layer.w2)
    for t in (1, 8, 32, 64, 128, 256):
        xs = [torch.randn(t, gpu.H, device="cuda", dtype=torch.bfloat16) for _ in range(gpu.NSETS)]
        routes = [layer.route(x) for x in xs]
        row = {"fp8": fp8, "tokens": t}
        for name, patch in VARIANTS.items():
            old = {key: getattr(moe_triton, key) for key in patch}
            for key, val in patch.items():
                setattr(moe_triton, key, val)
            try:
                row[name] = gpu.graph_time(xs, routes, wargs, kw) * 1e6
            finally:
                for key, val in old.items():
                    setattr(moe_triton, key, val)
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "ab_moe_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
