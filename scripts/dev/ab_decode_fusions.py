"""Dev: A/B of the decode-step launch fusions at Qwen3-30B-A3B(-FP8)'s full size (dummy weights,
CUDA graphs, engine alone, bench/full_size.py's decode loop): every fusion on, each one off, all
off. One engine per variant (the graphs bake the choice in); TPOT = median CUDA-event step time.
    PYTHONPATH=src python3 scripts/dev/ab_decode_fusions.py [--dtypes fp8,bf16] [--batches 1,32]
Fusions: ``attn_merge`` (decode attention's few splits merged by the split kernel, no combine
launch). Tried and removed after this A/B (bench/results/ab-decode-fusions-h100-80gb-hbm3.json):
fp8_linear split-K, the router matmul in the top-k launch, the MoE k-sum in the next RMSNorm."""
import argparse
import datetime
import gc
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
import full_size  # noqa: E402

from eplb.kernels import decode_attention  # noqa: E402

SWITCHES = {"attn_merge": (decode_attention, "_MERGE_MAX_SPLITS", 1)}
VARIANTS = {"all_on": (), **{f"no_{k}": (k,) for k in SWITCHES}}
if len(SWITCHES) > 1:
    VARIANTS["all_off"] = tuple(SWITCHES)


def run_variant(kind, off, args, tmp):
    saved = {k: getattr(mod, name) for k, (mod, name, _) in SWITCHES.items()}
    for k in off:
        mod, name, val = SWITCHES[k]
        setattr(mod, name, val)
    try:
        core = full_size.build_engine(kind, args, torch.device(args.device), tmp)
        core.warm_up()
        timer = full_size.StepTimer(torch.device(args.device))
        out = {b: full_size.decode(core, b, args, timer, core.config.vocab_size)["tpot_ms"] for b in args.batches}
        del core
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return out
    finally:
        for k, (mod, name, _) in SWITCHES.items():
            setattr(mod, name, saved[k])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="2 small layers on the CPU (checks the script)")
    a = ap.parse_args()
    extra = ["--device", "cpu", "--small", "--layers", "2", "--prompt-len", "16", "--decode-steps", "2"] \
        if a.cpu_smoke else ["--device", "cuda", "--decode-steps", "20"]
    args = full_size.parse_args(["--batches", a.batches, "--warmup-steps", "3", "--count-steps", "1", *extra])
    args.dtype = "float32" if a.cpu_smoke else "bfloat16"
    res = {"device": full_size.device_name(args.device), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "method": "TPOT ms (median CUDA-event time of EngineCore.step(), CUDA graphs), prompts 512 tokens",
           "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.dtypes.split(","):
            for name in a.variants.split(","):
                tpot = run_variant(kind, VARIANTS[name], args, tmp)
                res["runs"][f"{kind}/{name}"] = tpot
                print(f"{kind:4s} {name:12s} " + "  ".join(f"b{b} {t:7.3f} ms" for b, t in tpot.items()), flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
