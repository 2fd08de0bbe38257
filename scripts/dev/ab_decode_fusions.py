"""Dev: A/B of the decode step's launch fusions and launch modes at Qwen3-30B-A3B(-FP8)'s full
size (dummy weights, CUDA graphs, engine alone, bench/full_size.py's decode loop): every switch on,
each one off, all off. One engine per variant (the graphs bake the choice in); TPOT = median
CUDA-event step time.
    PYTHONPATH=src python3 scripts/dev/ab_decode_fusions.py [--dtypes fp8,bf16] [--batches 1,32]
Switches: ``attn_merge`` (decode attention's few splits merged by the split kernel, no combine
launch), ``pdl`` (programmatic dependent launch of the Triton kernels, ``EPLB_PDL``),
``sum_in_gemm2`` (the MoE's sum over k by gemm2 up to 32 tokens), ``linear_swap`` (fp8_linear's
SWAP/TMA tiles up to 64 rows; off: the tiles before them), ``tail_one_row`` (the router tail
launch with one row per one-warp program up to 32 tokens), ``linear_split`` (fp8_linear's tiles up
to 16 rows from the split-K sweep; off: the tiles before it), ``router_matmul`` (the router matmul
in the top-k launch up to 16 tokens). A variant is a name below or tokens
joined by '+': ``no_X`` turns switch X off, ``with_Y`` turns on what is off by default or widens a
fusion: ``with_prefetch`` (under PDL, small calls' weights prefetched into L2 before the wait:
fp8_linear and the MoE GEMMs), ``with_sum_in_gemm2`` (the MoE's sum over k done by the down-projection launch, no
``_sum_kernel`` launch, up to 256 tokens instead of 32), ``with_sort_in_router`` (the router
launch also sorts the pairs by slot, no MoE sort launch, up to 32 tokens; off by default),
e.g.
``--variants no_pdl,no_pdl+with_sum_in_gemm2``. Tried and removed after this A/B
(bench/results/ab-decode-fusions-h100-80gb-hbm3.json): fp8_linear split-K with a chunked K loop
(``linear_split`` keeps the tuned loop; a heuristic that split every small call until the grid
had 128 programs lost 0.11 ms at batch 1), the router matmul in
the top-k launch as programs that each looped over the whole H (``router_matmul`` is the
second design: every program one slice of H), the MoE k-sum in the next RMSNorm; and after
bench/results/ab-router-fusions-h100-80gb-hbm3.json: the post-attention RMSNorm in the router
launch (every program recomputing its rows' norms; 1.1 ms slower per FP8 step); and after
bench/results/ab-linear-norm-moe-decode-h100-80gb-hbm3.json and ab-moe-decode-launch-h100-80gb-hbm3.json:
the post-attention RMSNorm by the o projection's launch (``with_linear_norm``: the row block's last
program normed its rows serially; 0.3 ms slower at batch 4, 1.8 ms at 16), and the whole MoE layer
in one persistent launch with grid barriers (``with_moe_decode``: 0.3-0.6 ms slower at batch 1, 0.6-1.2
at 4, 0.8-1.2 at 16, in every launch shape tried)."""
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

from eplb.kernels import decode_attention, linear_fp8, moe_triton, routing  # noqa: E402


def _set_attr(mod, name, value):
    old = getattr(mod, name)
    setattr(mod, name, value)
    return lambda: setattr(mod, name, old)


def _set_env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    return lambda: os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)


_pick_config = linear_fp8.pick_config


def _pick_config_before_swap(m: int, n: int, k: int) -> dict:
    """fp8_linear's tiles up to 64 rows before SWAP/TMA tiles were adopted (2026-12-07)."""
    if m > 64:
        return _pick_config(m, n, k)
    wide = n >= 4096
    if m <= 32:
        cfg = dict(BM=16, BN=64 if wide else 32, KSUB=2 if k <= 2048 else 8, num_stages=4 if wide else 3)
    else:
        cfg = dict(BM=64, BN=64 if wide else 16, KSUB=2 if k <= 2048 else 4, num_stages=4)
    while (k // 128) % cfg["KSUB"]:
        cfg["KSUB"] //= 2
    return dict(cfg, num_warps=4)


def _pick_config_before_split(m: int, n: int, k: int) -> dict:
    """fp8_linear's tiles up to 16 rows before the split-K sweep's were adopted (2026-12-07 22:35)."""
    if m > 16:
        return _pick_config(m, n, k)
    cfg = dict(BM=16, BN=64, KSUB=4, num_stages=4, SWAP=True, TMA=n < 4096)
    while (k // 128) % cfg["KSUB"]:
        cfg["KSUB"] //= 2
    return dict(cfg, num_warps=4)


# switch -> what turns it off (returns the undo)
SWITCHES = {
    "attn_merge": lambda: _set_attr(decode_attention, "_MERGE_MAX_SPLITS", 1),
    "pdl": lambda: _set_env("EPLB_PDL", "0"),
    "sum_in_gemm2": lambda: _set_attr(moe_triton, "SUM_IN_GEMM2_MAX_TOKENS", 0),
    "linear_swap": lambda: _set_attr(linear_fp8, "pick_config", _pick_config_before_swap),
    "tail_one_row": lambda: _set_attr(routing, "TAIL_ONE_ROW_MAX_TOKENS", 0),
    "linear_split": lambda: _set_attr(linear_fp8, "pick_config", _pick_config_before_split),
    "router_matmul": lambda: _set_attr(routing, "ROUTER_MATMUL_MAX_TOKENS", 0),
}
# what is off by default or a fusion's wider limit (variant token ``with_NAME``)
ENABLES = {
    "prefetch": lambda: (_set_attr(linear_fp8, "PREFETCH_MAX_M", 64),
                         _set_attr(moe_triton, "PREFETCH_MAX_BYTES", 32 << 20)),
    "sum_in_gemm2": lambda: _set_attr(moe_triton, "SUM_IN_GEMM2_MAX_TOKENS", 256),
    "sort_in_router": lambda: _set_attr(routing, "SORT_IN_ROUTER_MAX_TOKENS", routing.SORT_MAX_TOKENS),
}
VARIANTS = {"all_on": (), **{f"no_{k}": (k,) for k in SWITCHES}, "all_off": tuple(SWITCHES)}


def variant_switches(name: str) -> tuple:
    """A VARIANTS name, or tokens joined by '+': ``no_X`` (switch X off) and ``with_Y`` (fusion Y
    on), e.g. ``no_pdl+with_sum_in_gemm2``. -> the undo-returning setters to apply."""
    if name in VARIANTS:
        return tuple(SWITCHES[k] for k in VARIANTS[name])
    setters = []
    for part in name.split("+"):
        if part.startswith("no_") and part[3:] in SWITCHES:
            setters.append(SWITCHES[part[3:]])
        elif part.startswith("with_") and part[5:] in ENABLES:
            setters.append(ENABLES[part[5:]])
        else:
            raise SystemExit(f"--variants: unknown token {part!r}; known: "
                             f"{', '.join(['no_' + k for k in SWITCHES] + ['with_' + k for k in ENABLES])}")
    return tuple(setters)


def run_variant(kind, off, args, tmp):
    undo = []
    for setter in off:
        u = setter()
        undo.extend(u if isinstance(u, tuple) else (u,))
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
        for u in reversed(undo):
            u()


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
           "runs": {}, "rounds": []}  # runs: the last round of each variant; rounds: every one, in order
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.dtypes.split(","):
            for name in a.variants.split(","):
                tpot = run_variant(kind, variant_switches(name), args, tmp)
                res["runs"][f"{kind}/{name}"] = tpot
                res["rounds"].append({"dtype": kind, "variant": name, "tpot_ms": tpot})
                print(f"{kind:4s} {name:12s} " + "  ".join(f"b{b} {t:7.3f} ms" for b, t in tpot.items()), flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
