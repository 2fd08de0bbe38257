"""Dev bench (GPU): what a persistent "one launch per layer" decode kernel would pay, measured before
building one. A layer at batch 1 (FP8 Qwen3-30B-A3B) reads six weight slices one after another
(qkv, attention's KV, o, router, gate/up of 8 experts, down: MB below); each phase needs the one
before it finished on every SM. Three ways to run the same reads, per layer, from CUDA graphs:

- ``launches``: one launch per phase (today's shape: the step is a chain of launches);
- ``persistent``: one launch of one program per SM for all phases, a grid barrier between phases;
- ``persistent+prefetch``: the same, each program asking L2 for its share of the next phase's slice
  before it waits at the barrier, so the bytes stream across the barrier's latency;
- ``one_stream``: one launch reading every slice with no barrier (the read floor of these bytes).

Plus the barrier alone: microseconds per barrier of a persistent grid that does nothing else.
    PYTHONPATH=src python3 scripts/dev/bench_grid_barrier.py [--layers 8] [--out results.json]"""
import argparse
import datetime
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import gpu  # noqa: E402

from eplb.kernels.pdl import prefetch_l2  # noqa: E402

# bytes per phase of one FP8 layer at batch 1: qkv 2048x5120, KV of 512 tokens, o 4096x2048,
# router 128x2048 bf16, gate/up 8 x 1536x2048, down 8 x 2048x768 (scales left out)
PHASE_MB = [10.49, 0.52, 8.39, 0.52, 25.17, 12.58]
BLOCK = 4096  # int32 words per load: 16 KB per program per iteration


@triton.jit
def _grid_sync(cnt_ptr, gen_ptr, n):
    """All ``n`` programs wait here until every one has arrived. Self-resetting (the last arrival
    zeroes the counter and bumps the generation), so graph replays reuse the two words."""
    tl.debug_barrier()
    gen = tl.atomic_add(gen_ptr, 0, sem="relaxed", scope="gpu")
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(gen_ptr, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _prefetch(base, start, stop):
    """L2 prefetch of the 128-byte lines of int32 words [start, stop) from ``base``."""
    for c in range(start, stop, 32 * 1024):
        prefetch_l2(base + tl.minimum(c + tl.arange(0, 1024) * 32, stop - 1))


@triton.jit
def _read_phases(w_ptr, bounds_ptr, out_ptr, cnt_ptr, gen_ptr, p0, p1,
                 BARRIER: tl.constexpr, PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    """Phases [p0, p1): program i reads its share of words [bounds[p], bounds[p+1]) of ``w``."""
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for p in range(p0, p1):
        lo = tl.load(bounds_ptr + p)
        hi = tl.load(bounds_ptr + p + 1)
        share = tl.cdiv(tl.cdiv(hi - lo, n), BLOCK) * BLOCK
        a = lo + pid * share
        b = tl.minimum(a + share, hi)
        for c in range(a, b, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            acc += tl.load(w_ptr + offs, mask=offs < b, other=0, cache_modifier=".cg")
        if BARRIER:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if p + 1 < p1:
                if PREFETCH:
                    nlo = hi
                    nhi = tl.load(bounds_ptr + p + 2)
                    nshare = tl.cdiv(tl.cdiv(nhi - nlo, n), BLOCK) * BLOCK
                    na = nlo + pid * nshare
                    _prefetch(w_ptr, na, tl.minimum(na + nshare, nhi))
                _grid_sync(cnt_ptr, gen_ptr, n)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


@triton.jit
def _barriers_only(out_ptr, cnt_ptr, gen_ptr, n_barriers):
    n = tl.num_programs(0)
    for _ in range(n_barriers):
        _grid_sync(cnt_ptr, gen_ptr, n)
    tl.store(out_ptr + tl.program_id(0), n_barriers)


def graph_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of one replay of a CUDA graph of ``fn`` (after warm-up)."""
    return 1000 * gpu.graph_time_fn(lambda _: fn(), reps=reps, sets=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--programs-per-sm", default="1,2")
    ap.add_argument("--warps", default="8,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    words = [int(mb * 1e6) // 4 for mb in PHASE_MB] * args.layers
    bounds = torch.tensor([0] + list(torch.tensor(words).cumsum(0)), dtype=torch.int64, device=dev)
    total_bytes = 4 * int(bounds[-1])
    w = torch.randint(-100, 100, (int(bounds[-1]),), dtype=torch.int32, device=dev)
    sync = torch.zeros(64, dtype=torch.int32, device=dev)
    cnt, gen = sync[0:], sync[32:]
    ceil = gpu.ceilings()
    rows = []
    phases = len(words)
    for pps in (int(v) for v in args.programs_per_sm.split(",")):
        n = sms * pps
        out = torch.empty(n * BLOCK, dtype=torch.int32, device=dev)
        for warps in (int(v) for v in args.warps.split(",")):
            kw = dict(BLOCK=BLOCK, num_warps=warps)

            def launches():
                for p in range(phases):
                    _read_phases[(n,)](w, bounds, out, cnt, gen, p, p + 1, BARRIER=False, PREFETCH=False, **kw)

            def persistent(prefetch: bool):
                return lambda: _read_phases[(n,)](w, bounds, out, cnt, gen, 0, phases, BARRIER=True,
                                                  PREFETCH=prefetch, **kw)

            # the floor: one launch, the same bytes, one phase spanning them all
            flat = torch.tensor([0, int(bounds[-1])], dtype=torch.int64, device=dev)

            def one_stream():
                _read_phases[(n,)](w, flat, out, cnt, gen, 0, 1, BARRIER=False, PREFETCH=False, **kw)

            ref = None
            for name, fn in (("one_stream", one_stream), ("launches", launches),
                             ("persistent", persistent(False)), ("persistent+prefetch", persistent(True))):
                ms = graph_ms(fn)
                got = out.view(n, BLOCK).sum(1).sum().item()
                # a launch per phase leaves only its last phase's sums in ``out``: not compared
                if name.startswith("persistent") and got != ref:
                    raise SystemExit(f"{name}: read sum {got} != one_stream's {ref}")
                ref = got if name == "one_stream" else ref
                rows.append(dict(variant=name, programs=n, programs_per_sm=pps, num_warps=warps,
                                 us_per_layer=round(1000 * ms / args.layers, 2),
                                 gbps=round(total_bytes / ms / 1e6, 1)))
                print(f"{name:20s} P={n:4d} warps={warps:2d}  {rows[-1]['us_per_layer']:7.2f} us/layer  "
                      f"{rows[-1]['gbps']:7.1f} GB/s", flush=True)
            nb = 64
            t1 = graph_ms(lambda: _barriers_only[(n,)](out, cnt, gen, 1, num_warps=warps))
            t2 = graph_ms(lambda: _barriers_only[(n,)](out, cnt, gen, nb + 1, num_warps=warps))
            rows.append(dict(variant="barrier_only", programs=n, programs_per_sm=pps, num_warps=warps,
                             us_per_barrier=round(1000 * (t2 - t1) / nb, 3)))
            print(f"barrier alone        P={n:4d} warps={warps:2d}  {rows[-1]['us_per_barrier']:.3f} us/barrier",
                  flush=True)
    doc = dict(method=__doc__.split("\n")[0], gpu=torch.cuda.get_device_name(dev), torch=torch.__version__,
               triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               phase_mb=PHASE_MB, layers=args.layers, ceilings=ceil, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
