"""Time the Triton split-K decode attention at the Qwen3-30B-A3B shape (Hq=32, Hkv=4, D=128, bf16).

    python scripts/dev/bench_decode_attention.py [--sweep] [--sweep-only --cases 64:540,256:540]

For B in 1, 32, 128 and ctx in 64, 1024, 8192 (every row at that ctx, cache max_len 8320, slots in
shuffled order): microseconds per call measured with CUDA events around CUDA-graph replays (how the
engine runs decode; no launch overhead) and eager, and GB/s on the K/V bytes read
(B*Hkv*ctx*D*2 tensors*2 bytes). Baseline: torch SDPA over the first B slots (what attention.attend
does for a dense equal-length decode batch). --sweep also times kernel configs on a few cases.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import eplb.kernels.decode_attention as da

HQ, HKV, D, MAX_LEN = 32, 4, 128, 8320


def make(b: int, ctx: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(b, HKV, MAX_LEN, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    slots = torch.randperm(b, device="cuda", generator=g)
    ctx_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    return q, k, v, slots, ctx_lens


def time_us(fn, graph: bool, inner: int = 10, reps: int = 10) -> float:
    """Mean microseconds per fn() call: a graph of `inner` calls replayed `reps` times, or eager."""
    fn()
    torch.cuda.synchronize()
    if graph:
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(inner):
                fn()
        gr.replay()
        run = gr.replay
    else:
        def run():
            for _ in range(inner):
                fn()
        run()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        run()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / (reps * inner)


def kv_gb(b: int, ctx: int) -> float:
    return b * HKV * ctx * D * 2 * 2 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--cases", default="1:1024,1:8192,32:64,32:1024,32:8192,128:1024,128:8192",
                    help="the sweep's B:ctx cases")
    ap.add_argument("--sweep-only", action="store_true", help="skip the fixed table")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", da.triton.__version__)
    scale = D**-0.5
    print(f"{'B':>4} {'ctx':>5} {'ns':>4} {'graph_us':>9} {'GB/s':>7} {'eager_us':>9} "
          f"{'sdpa_us':>8} {'sdpa_GB/s':>9} {'maxerr':>7}")
    for b in () if args.sweep_only else (1, 32, 128):
        for ctx in (64, 1024, 8192):
            q, k, v, slots, ctx_lens = make(b, ctx)
            fn = lambda: da.decode_attention(q, k, v, slots, ctx_lens, scale)  # noqa: E731
            tg = time_us(fn, graph=True)
            te = time_us(fn, graph=False)
            ks, vs = k[:, :, :ctx], v[:, :, :ctx]
            sd = lambda: F.scaled_dot_product_attention(  # noqa: E731
                q.unsqueeze(2), ks, vs, scale=scale, enable_gqa=True)
            ts = time_us(sd, graph=True)
            # the reference for row r reads slot slots[r] (the baseline above reads slot r): gather
            ref = F.scaled_dot_product_attention(q.unsqueeze(2), k[slots, :, :ctx], v[slots, :, :ctx],
                                                 scale=scale, enable_gqa=True).squeeze(2)
            err = (fn().float() - ref.float()).abs().max().item()
            ns = da.split_plan(b, HKV, MAX_LEN)
            print(f"{b:>4} {ctx:>5} {ns:>4} {tg:>9.1f} {kv_gb(b, ctx) / tg * 1e6:>7.0f} {te:>9.1f} "
                  f"{ts:>8.1f} {kv_gb(b, ctx) / ts * 1e6:>9.0f} {err:>7.4f}")
            q = k = v = ks = vs = None  # free the cache before the next case
            torch.cuda.empty_cache()
    if args.sweep or args.sweep_only:
        sweep(scale, [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")])


def sweep(scale: float, cases: list[tuple[int, int]]) -> None:
    data = {c: make(*c) for c in cases}
    refs = {}
    for c, (q, k, v, slots, _) in data.items():
        refs[c] = F.scaled_dot_product_attention(q.unsqueeze(2), k[slots, :, :c[1]], v[slots, :, :c[1]],
                                                 scale=scale, enable_gqa=True).squeeze(2).float()
    print("sweep: graph us per (B, ctx)", cases)
    default = (64, 4, 2)
    configs = [(bn, w, s, da._TARGET_PROGRAMS) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    configs += [(*default, t) for t in (128, 256, 1024, 2048, 4096, 8192)]
    for bn, w, s, target in configs:
        row, err = [], 0.0
        for c in cases:
            q, k, v, slots, ctx_lens = data[c]
            fn = lambda: da._decode_attention(  # noqa: E731
                q, k, v, slots, ctx_lens, scale, block_n=bn, num_warps=w, num_stages=s, target_programs=target)
            try:
                row.append(time_us(fn, graph=True))
                err = max(err, (fn().float() - refs[c]).abs().max().item())
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                row.append(float("nan"))
                print("  fail", bn, w, s, type(e).__name__)
        print(f"target={target:>5} bn={bn:>3} warps={w} stages={s}: " + " ".join(f"{t:7.1f}" for t in row)
              + f"  sum={sum(row):8.1f} maxerr={err:.4f}")


if __name__ == "__main__":
    main()
