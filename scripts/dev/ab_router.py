"""Dev: the router at decode sizes, Qwen3-30B-A3B's shape (H 2048, 128 experts, top-8), microseconds
per call from a CUDA graph over distinct weight copies: cuBLAS F.linear + route_topk (two launches)
against route_logits_topk (one) with each ROUTER_LAUNCH candidate, optionally also sorting the
pairs for the MoE (``pair_sort``).
    PYTHONPATH=src python3 scripts/dev/ab_router.py [--tokens 1,8,16,32] [--out results.json]"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels import routing  # noqa: E402
from eplb.kernels.moe_triton import new_pair_sort  # noqa: E402

H, E, K, SETS = 2048, 128, 8, 16
CANDS = [dict(KS=ks, num_warps=w) for ks in (128, 256, 512) for w in (4, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,16,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    ws = [torch.randn(E, H, device=dev, dtype=torch.bfloat16) / H**0.5 for _ in range(SETS)]
    load = torch.zeros(E, dtype=torch.int64, device=dev)
    slot_map = torch.arange(E, device=dev)
    shipped = dict(routing.ROUTER_LAUNCH)
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        xs = [torch.randn(t, H, device=dev, dtype=torch.bfloat16) for _ in range(SETS)]
        for sort in (False, True):
            sorts = [new_pair_sort(t * K, E, True, dev) if sort else None for _ in range(SETS)]
            kw = dict(weight_dtype=torch.bfloat16, slot_map=slot_map, load=load)
            row = {"tokens": t, "pair_sort": sort, "cublas_plus_route_topk_us": gpu.graph_time_fn(
                lambda j: routing.route_topk(F.linear(xs[j], ws[j]), K, True, pair_sort=sorts[j], **kw),
                sets=SETS) * 1e6}
            for cand in CANDS:
                routing.ROUTER_LAUNCH.update(cand)
                try:
                    row[json.dumps(cand)] = gpu.graph_time_fn(
                        lambda j: routing.route_logits_topk(xs[j], ws[j], None, K, True, pair_sort=sorts[j], **kw),
                        sets=SETS) * 1e6
                finally:
                    routing.ROUTER_LAUNCH.update(shipped)
            rows.append(row)
            best = min((v, k) for k, v in row.items() if k.startswith("{"))
            print(f"T={t:3d} sort={sort!s:5}  cuBLAS+tail {row['cublas_plus_route_topk_us']:6.2f} us  fused best "
                  f"{best[0]:6.2f} {best[1]}  shipped {row[json.dumps(shipped)]:6.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": "PYTHONPATH=src python3 scripts/dev/ab_router.py --tokens " + args.tokens,
                       "method": "us per call, CUDA graph of 16 calls over distinct gate weights; H 2048, "
                                 "128 experts, top-8, bf16", "shipped": shipped, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
