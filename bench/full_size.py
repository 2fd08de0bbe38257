"""Engine-alone decode and prefill at Qwen3-30B-A3B's full size, dummy weights, bf16 and FP8.

One GPU call (reads nothing from the network):
    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 bench/full_size.py
CPU smoke test of the same code at a tiny size:
    PYTHONPATH=src python bench/full_size.py --device cpu --small --layers 2 --batches 1,4 \
        --prompt-len 32 --decode-steps 3 --prefill-len 256

In one run: the hardware ceilings (bench/gpu.py's: device-to-device copy counting bytes read +
written, the read rate of a reduction, bf16 and FP8 8192^3 matmuls); then per dtype (bf16 =
configs/Qwen3-30B-A3B, FP8 = configs/Qwen3-30B-A3B-FP8 with its block-FP8 weights kept in FP8)
an ``EngineCore`` with ``load_format="dummy"`` and CUDA graphs (captured at start, as the server
does), detokenization off (token ids only), and:
- decode at batch 1, 32, 64, 128, 256: prompts of ``--prompt-len`` random ids, greedy,
  ignore_eos; once every prompt is in, ``--warmup-steps`` steps, then ``--decode-steps`` timed
  steps (a CUDA event at the start of each ``step()``, none waited on in between: the median
  interval is TPOT; with async scheduling a step launches the next before it returns);
  ``--compare-async-off`` times the same steps again with it off; then ``--count-steps`` steps whose
  router output is counted (distinct experts per layer, from the layers' load counters);
- the byte floor of a decode step: every non-expert weight (attention, router, norms, lm_head;
  the embedding is gathered, B rows) + every expert at least one token routes to + the KV cache
  read (each sequence's context), at the measured copy rate; TPOT / floor;
- prefill of one ``--prefill-len``-token prompt (one forward, the last row's logits; median of
  ``--prefill-reps`` after two warm-ups): tokens/s and FLOP/s against the matmul rate of the
  weights' dtype (linear-layer FLOPs, attention FLOPs reported beside them).
Writes bench/results/full-size-<device>.json (after every stage, so a cut-off run keeps what it
measured) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, HERE)

from machine import device_name  # noqa: E402

CONFIGS = {"bf16": os.path.join(ROOT, "configs", "Qwen3-30B-A3B"),
           "fp8": os.path.join(ROOT, "configs", "Qwen3-30B-A3B-FP8")}
# --small: every dim shrunk, 128 experts and top-8 kept (so expert counting means the same)
SMALL = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=4096)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class StepTimer:
    """Seconds of one call: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, dev: torch.device):
        self.dev = dev

    def intervals(self, fn, n: int) -> list[float]:
        """Seconds between the starts of n back-to-back calls of fn and the end of the last: a
        mark before each call, none waited on until the end (so a step that launches the next
        one before it returns, async scheduling, is timed as it runs)."""
        if self.dev.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            for i in range(n):
                marks[i].record()
                fn()
            marks[n].record()
            marks[n].synchronize()
            return [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(n)]
        stamps = []
        for _ in range(n):
            stamps.append(time.perf_counter())
            fn()
        stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def __call__(self, fn):
        if self.dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def ceilings(dev: torch.device, small: bool) -> dict:
    """bench/gpu.py's ceilings on CUDA; on the CPU the same quantities at small sizes."""
    if dev.type == "cuda" and not small:
        import gpu

        return gpu.ceilings()
    timer, n, m = StepTimer(dev), (1 << 24), 512
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(n, device=dev, dtype=dt)
    y = torch.empty_like(x)
    med = lambda fn: statistics.median(timer(fn)[0] for _ in range(5))  # noqa: E731
    out = {"reduction_read_GBps": x.numel() * x.element_size() / med(lambda: x.sum(dtype=torch.float32)) / 1e9,
           "copy_GBps_read_plus_write": 2 * x.numel() * x.element_size() / med(lambda: y.copy_(x)) / 1e9}
    a, b = torch.randn(m, m, device=dev, dtype=dt), torch.randn(m, m, device=dev, dtype=dt)
    out["bf16_matmul_TFLOPs"] = 2 * m**3 / med(lambda: a @ b) / 1e12
    out["fp8_matmul_TFLOPs"] = None
    out["note"] = f"small sizes ({n} elements, {m}^3 matmul in {dt}), smoke test only"
    return out


def model_dir(kind: str, layers: int | None, small: bool, tmp: str) -> str:
    """A copy of the shipped config (and its id tokenizer) with the requested overrides."""
    src = CONFIGS[kind]
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if small:
        cfg.update(SMALL)
    dst = os.path.join(tmp, kind)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(dst, "id_tokenizer.json"), "w") as f:
        json.dump({"vocab_size": cfg["vocab_size"]}, f)
    return dst


def weight_bytes(model) -> dict:
    """Bytes a decode step must read besides experts and KV: every parameter except the expert
    tensors and the embedding (gathered row by row; counted when it is also the lm_head)."""
    expert_ptrs, per_expert = set(), 0
    for layer in model.moe_layers():
        t = layer.expert_tensors()
        expert_ptrs.update(v.data_ptr() for v in t.values())
        per_expert = sum(v[0].numel() * v.element_size() for v in t.values())
    skip = expert_ptrs | ({model.embed.data_ptr()} if model.lm_head is not model.embed else set())
    dense = 0
    for p in model.parameters():  # a tied lm_head is the embedding: listed once, counted
        if p.data_ptr() not in skip:
            dense += p.numel() * p.element_size()
    return {"dense_bytes": dense, "expert_bytes": per_expert}


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def decode_tokens(args, batch: int) -> int:
    """Tokens each request may generate: the steps while the other prompts go in (the first ones
    decode meanwhile) + warm-up + timed + counted steps, with room to spare, so no request
    finishes (and shrinks the batch) before the counting is done."""
    timed = args.decode_steps * (2 if args.compare_sync else 1)
    return -(-batch * args.prompt_len // args.chunk) + args.warmup_steps + timed + args.count_steps + 10


@torch.inference_mode()
def decode(core, batch: int, args, timer: StepTimer, vocab: int) -> dict:
    from eplb.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch)
    n_steps = decode_tokens(args, batch)
    for b in range(batch):
        core.add_request(f"d{batch}-{b}", torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist(),
                         SamplingParams(max_tokens=n_steps + 4, temperature=0.0, ignore_eos=True))
    seqs = list(core._seqs.values())
    while any(s.num_computed < len(s.prompt_ids) for s in seqs):  # prefill (chunked) until all are in
        core.step()
    for _ in range(args.warmup_steps):
        core.step()
    ctx = [sum(s.num_tokens for s in seqs) + batch * i for i in range(args.decode_steps)]  # keys attended
    times = timer.intervals(core.step, args.decode_steps)
    sync_times = None
    if args.compare_sync:  # the same steps with async scheduling off, same run (a ratio)
        core.set_async_scheduling(False)
        core.step()
        sync_times = timer.intervals(core.step, args.decode_steps)
        core.set_async_scheduling(True)
        core.step()
    layers = core.model.moe_layers()
    for lay in layers:
        lay.take_load()
    distinct = []
    for _ in range(args.count_steps):
        core.step()
        loads = torch.stack([lay.take_load() for lay in layers]).cpu()
        distinct.append((loads > 0).sum(1).float())
    assert all(not s.finished for s in seqs), "a request finished before the counting steps were done"
    for s in seqs:
        core.abort_request(s.request_id)
    per_layer = torch.stack(distinct).mean(0)
    return {"batch": batch, "tpot_ms": statistics.median(times) * 1e3, "tpot_ms_min": min(times) * 1e3,
            "tokens_per_s": batch / statistics.median(times), "mean_context": statistics.mean(ctx) / batch,
            "kv_tokens_read": statistics.mean(ctx), "experts_touched_per_step": float(per_layer.sum()),
            "experts_touched_per_layer": float(per_layer.mean()),
            "tpot_ms_async_off": statistics.median(sync_times) * 1e3 if sync_times else None}


@torch.inference_mode()
def prefill(core, n: int, reps: int, timer: StepTimer, vocab: int) -> float:
    """Seconds of one forward over an n-token prompt (+ its last row's logits), median."""
    from eplb.engine.kv_cache import KVCache
    from eplb.model.attention import AttentionMetadata

    cfg, dev = core.config, core.device
    kv = KVCache(num_layers=cfg.num_layers, num_slots=1, max_len=n, num_kv_heads=cfg.num_kv_heads,
                 head_dim=cfg.head_dim, dtype=core.dtype, device=dev)
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(7)).to(dev)
    if core.model.rope.cos.shape[0] < n:
        # the engine sized its RoPE tables to the decode runs' max_model_len; this forward is
        # longer (the decode graphs keep the old tables: no decode step runs after this)
        from eplb.model.transformer import Rope

        core.model.rope = Rope(cfg.head_dim, cfg.rope_theta, n, dev)

    def fwd():
        meta = AttentionMetadata.build([], [(0, 0, n)], device=dev)
        h = core.model(ids, meta, kv.layers, num_real_tokens=0)
        return core.model.compute_logits(h[-1:])

    for _ in range(2):
        fwd()
    sync(dev)
    times = [timer(fwd)[0] for _ in range(reps)]
    return statistics.median(times)  # kv is freed with this frame


def prefill_flops_per_token(cfg, n: int) -> tuple[float, float]:
    """(linear-layer FLOPs, attention FLOPs) per prompt token of an n-token causal prefill."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    attn_proj = (hq + 2 * hkv) * d * h + h * hq * d
    n_moe = len(cfg.moe_layers)
    moe = cfg.num_experts * h + cfg.top_k * 3 * h * cfg.moe_intermediate_size  # router + active experts
    dense = 3 * h * cfg.intermediate_size
    linear = 2 * (cfg.num_layers * attn_proj + n_moe * moe + (cfg.num_layers - n_moe) * dense)
    attention = cfg.num_layers * 2 * hq * d * (n + 1)  # QK^T and PV over (n + 1) / 2 keys on average
    return float(linear), float(attention)


def build_engine(kind: str, args, dev: torch.device, tmp: str):
    """An EngineCore on ``kind``'s config with dummy weights, sized for ``args``' decode runs,
    detokenization off (engine alone: token ids only); CUDA graphs not yet captured."""
    from eplb.engine.core import EngineCore

    dtype = args.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    batches = args.batches
    core = EngineCore(model_dir(kind, args.layers, args.small, tmp), load_format="dummy", dtype=dtype,
                      device=str(dev), max_model_len=args.prompt_len + decode_tokens(args, max(batches)) + 8,
                      max_num_seqs=max(batches), max_num_batched_tokens=max(args.chunk, max(batches)),
                      skip_tokenizer_init=True)
    return core


def run_dtype(kind: str, args, dev: torch.device, ceil: dict, tmp: str, res: dict) -> dict:
    batches = args.batches
    t0 = time.perf_counter()
    core = build_engine(kind, args, dev, tmp)
    sync(dev)
    load_s = time.perf_counter() - t0
    dtype = str(core.dtype).replace("torch.", "")
    t0 = time.perf_counter()
    graphs = core.warm_up()
    sync(dev)
    capture_s = time.perf_counter() - t0
    cfg = core.config
    w = weight_bytes(core.model)
    wdt = str(core.model.moe_layers()[0].w13.dtype).replace("torch.", "")
    kvt = kv_bytes_per_token(cfg, core.dtype)
    rate = ceil["copy_GBps_read_plus_write"] * 1e9
    out = {"config": os.path.relpath(CONFIGS[kind], ROOT), "layers": cfg.num_layers, "small": args.small,
           "compute_dtype": dtype, "expert_weight_dtype": wdt, "load_s": load_s, "capture_s": capture_s,
           "cuda_graphs": graphs, "dense_weight_bytes": w["dense_bytes"], "bytes_per_expert": w["expert_bytes"],
           "kv_bytes_per_token": kvt, "decode": [], "prefill": None}
    res["runs"][kind] = out
    print(f"[{kind}] loaded in {load_s:.1f}s (experts {wdt}), graphs {graphs} captured in {capture_s:.1f}s; "
          f"non-expert weights {w['dense_bytes'] / 1e9:.2f} GB, "
          f"{w['expert_bytes'] / 1e6:.2f} MB per expert", flush=True)
    timer = StepTimer(dev)
    for b in batches:
        r = decode(core, b, args, timer, cfg.vocab_size)
        floor_bytes = w["dense_bytes"] + r["experts_touched_per_step"] * w["expert_bytes"] + r["kv_tokens_read"] * kvt
        r["floor_bytes"] = floor_bytes
        r["floor_ms"] = floor_bytes / rate * 1e3
        r["floor_ms_at_reduction_rate"] = floor_bytes / (ceil["reduction_read_GBps"] * 1e9) * 1e3
        r["tpot_over_floor"] = r["tpot_ms"] / r["floor_ms"]
        r["achieved_GBps"] = floor_bytes / (r["tpot_ms"] / 1e3) / 1e9
        out["decode"].append(r)
        print(f"[{kind}] decode batch {b:4d}: TPOT {r['tpot_ms']:8.3f} ms  floor {r['floor_ms']:8.3f} ms  "
              f"x{r['tpot_over_floor']:.2f}  experts/layer {r['experts_touched_per_layer']:6.1f}  "
              f"ctx {r['mean_context']:.0f}  {r['tokens_per_s']:9.1f} tok/s"
              + (f"  (async off: {r['tpot_ms_async_off']:.3f} ms)" if r["tpot_ms_async_off"] else ""), flush=True)
        write(res, args)
    if args.prefill_len:
        sec = prefill(core, args.prefill_len, args.prefill_reps, timer, cfg.vocab_size)
        lin, att = prefill_flops_per_token(cfg, args.prefill_len)
        tps = args.prefill_len / sec
        mm = ceil["fp8_matmul_TFLOPs"] if wdt.startswith("float8") else ceil["bf16_matmul_TFLOPs"]
        p = {"tokens": args.prefill_len, "ms": sec * 1e3, "tokens_per_s": tps,
             "linear_TFLOPs": tps * lin / 1e12, "with_attention_TFLOPs": tps * (lin + att) / 1e12,
             "matmul_ceiling_TFLOPs": mm,
             "linear_frac_of_matmul": tps * lin / 1e12 / mm if mm else None,
             "with_attention_frac_of_matmul": tps * (lin + att) / 1e12 / mm if mm else None,
             "linear_frac_of_bf16_matmul": tps * lin / 1e12 / ceil["bf16_matmul_TFLOPs"]}
        out["prefill"] = p
        frac = f"{p['linear_frac_of_matmul']:.2f}" if mm else "n/a"
        print(f"[{kind}] prefill {args.prefill_len} tokens: {sec * 1e3:.1f} ms  {tps:,.0f} tok/s  "
              f"{p['linear_TFLOPs']:.1f} TFLOP/s linear ({frac} of the {'FP8' if wdt.startswith('float8') else 'bf16'} "
              f"matmul rate), "
              f"{p['with_attention_TFLOPs']:.1f} with attention", flush=True)
        write(res, args)
    del core
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def out_path(res: dict, args) -> str:
    slug = res["device"].replace("NVIDIA ", "").split(" (")[0].replace(" ", "-").lower()
    if args.device == "cpu":
        slug = "cpu"
    suffix = ("-small" if args.small else "") + (f"-{args.layers}layers" if args.layers else "")
    if sorted(args.dtypes) != sorted(CONFIGS):  # a one-dtype run does not overwrite the full one
        suffix += "-" + "-".join(args.dtypes)
    return os.path.join(args.out, f"full-size-{slug}{suffix}.json")


def write(res: dict, args) -> str:
    os.makedirs(args.out, exist_ok=True)
    path = out_path(res, args)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return path


def summary(res: dict) -> None:
    print("\n| dtype | batch | TPOT ms | floor ms | TPOT/floor | experts/layer | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, run in res["runs"].items():
        for r in run["decode"]:
            print(f"| {kind} | {r['batch']} | {r['tpot_ms']:.2f} | {r['floor_ms']:.2f} | {r['tpot_over_floor']:.2f} | "
                  f"{r['experts_touched_per_layer']:.1f} | {r['tokens_per_s']:.0f} |")
    for kind, run in res["runs"].items():
        p = run.get("prefill")
        if p:
            frac = f"{p['linear_frac_of_matmul']:.2f}" if p["linear_frac_of_matmul"] is not None else "n/a"
            print(f"prefill {kind}: {p['tokens_per_s']:,.0f} tok/s, {p['linear_TFLOPs']:.1f} TFLOP/s linear "
                  f"= {frac} of its matmul rate")
    if "fp8_over_bf16_tpot_b32" in res:
        print(f"FP8 / bf16 TPOT at batch 32: {res['fp8_over_bf16_tpot_b32']:.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtypes", default="bf16,fp8", help="which configs: bf16, fp8 (default: both)")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    ap.add_argument("--small", action="store_true", help="shrink every dim (128 experts, top-8 kept)")
    ap.add_argument("--batches", default="1,32,64,128,256")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=30)
    ap.add_argument("--count-steps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8192, help="max tokens per step while prompts go in")
    ap.add_argument("--prefill-len", type=int, default=8192, help="0 = skip the prefill measurement")
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--compare-async-off", dest="compare_sync", action="store_true",
                    help="also time each batch's decode steps with async scheduling off (tpot_ms_async_off)")
    ap.add_argument("--tile-table", default=None,
                    help="JSON {dtype: {pairs: config}} merged over the fused MoE's tile table (A/B of tunings)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    kinds = args.dtypes.split(",")
    bad = [k for k in kinds if k not in CONFIGS]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; allowed: {', '.join(CONFIGS)}")
    args.dtypes = kinds
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if min(args.batches) < 1 or min(args.decode_steps, args.count_steps, args.prompt_len) < 1:
        ap.error("--batches, --decode-steps, --count-steps and --prompt-len must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/full_size.py: --device cuda but no CUDA GPU (use --device cpu --small for a smoke test)",
              file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {"device": device_name(args.device), "torch": torch.__version__, "triton": triton_version,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "args": {k: v for k, v in vars(args).items() if k != "out"},
           "method": "engine alone (EngineCore, load_format=dummy, CUDA graphs, no detokenization); TPOT = "
                     "median interval between CUDA events recorded at the start of consecutive decode step() calls "
                     "(none waited on in between, so async scheduling runs as in serving); "
                     "floor = (non-expert weights + distinct routed "
                     "experts x bytes per expert + KV read) / device copy rate (read + written)",
           "runs": {}}
    print(f"{res['device']}, torch {res['torch']}, triton {triton_version}, {res['date']}", flush=True)
    if args.tile_table:
        from eplb.kernels.tile_table import TABLE

        with open(args.tile_table) as f:
            override = json.load(f)
        for key, entries in override.items():
            TABLE[key].update(entries)
        res["tile_table_override"] = override
    res["ceilings"] = ceilings(dev, args.small)
    print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in res["ceilings"].items()
                                   if isinstance(v, float)), flush=True)
    write(res, args)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.dtypes:
            run_dtype(kind, args, dev, res["ceilings"], tmp, res)
    runs = res["runs"]
    if "bf16" in runs and "fp8" in runs:
        b32 = {k: next((r for r in runs[k]["decode"] if r["batch"] == 32), None) for k in ("bf16", "fp8")}
        if all(b32.values()):
            res["fp8_over_bf16_tpot_b32"] = b32["fp8"]["tpot_ms"] / b32["bf16"]["tpot_ms"]
    path = write(res, args)
    summary(res)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
