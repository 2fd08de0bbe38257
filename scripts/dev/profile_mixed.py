"""Where a served step's time goes when prefill chunks share it with decodes (full size, one GPU).

Served at concurrency 256 (512-token prompts, 256 output tokens) most steps decode 256 rows from
the CUDA graphs, but every step that also carries new prompts runs eager. This times such steps
against the decode-only step and the same prefill alone, and prints a profiler table of one:

    PYTHONPATH=src python3 scripts/dev/profile_mixed.py --dtype fp8

Steps (each the median of --reps, wall clock around ``EngineCore.step()`` with a device sync, as
the server sees it): ``decode`` 256 rows; ``mixed-K`` 256 - K decodes + K new 512-token prompts;
``prefill-K`` K new prompts alone. Prints only.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src"))

CONFIGS = {"bf16": os.path.join(ROOT, "configs", "Qwen3-30B-A3B"),
           "fp8": os.path.join(ROOT, "configs", "Qwen3-30B-A3B-FP8")}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def table(fn, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    gpu = collections.defaultdict(lambda: [0, 0.0])
    cpu = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            p = gpu[ev.name[:80]]
            p[0] += 1
            p[1] += ev.device_time_total
        else:
            p = cpu[ev.name[:80]]
            p[0] += 1
            p[1] += ev.self_cpu_time_total
    print(f"    GPU kernels {sum(v[0] for v in gpu.values())}, {sum(v[1] for v in gpu.values()) / 1e3:.2f} ms;"
          f" CPU self time {sum(v[1] for v in cpu.values()) / 1e3:.2f} ms")
    for title, d in (("GPU", gpu), ("CPU self", cpu)):
        print(f"   {title}:")
        for name, (n, us) in sorted(d.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"    {us / 1e3:8.3f} ms  {n:6d}x  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp8")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--profile", default="mixed-16")
    ap.add_argument("--model", default=None, help="a model folder instead of --dtype's config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-graph-tokens", default="2048",
                    help="comma list: the whole run once per value (the batch or less: mixed steps eager)")
    args = ap.parse_args()
    for mgt in args.max_graph_tokens.split(","):
        print(f"== max_graph_tokens {mgt}", flush=True)
        run(args, int(mgt))
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


@torch.inference_mode()
def run(args, max_graph_tokens: int) -> None:
    from eplb.engine.core import EngineCore
    from eplb.engine.sampling import SamplingParams

    news = [int(k) for k in args.new.split(",")]
    b, plen = args.batch, args.prompt_len
    core = EngineCore(args.model or CONFIGS[args.dtype], load_format="dummy", dtype="bfloat16",
                      device=args.device, max_model_len=plen + 300, max_num_seqs=b + max(news),
                      max_num_batched_tokens=8192,
                      skip_tokenizer_init=True, max_graph_tokens=max_graph_tokens)
    core.set_graph_max_batch(b)
    t = time.perf_counter()
    core.warm_up()
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    vocab = core.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    counter = itertools.count()
    params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)

    def add(n: int, length: int = plen) -> None:
        for _ in range(n):
            core.add_request(f"r{next(counter)}", torch.randint(0, vocab, (length,), generator=gen).tolist(), params)

    def running() -> list:
        return list(core.scheduler.running)

    def drop(n: int) -> None:
        for s in running()[:n]:
            core.abort_request(s.request_id)

    add(b)
    while any(s.num_computed < len(s.prompt_ids) for s in running()) or core.scheduler.waiting:
        core.step()
    for _ in range(3):
        core.step()
    res: dict[str, float] = {}
    res["decode"] = statistics.median(wall(core.step) for _ in range(5))

    def mixed(k: int) -> None:
        drop(k)
        add(k)
        core.schedule_step()

    for k in news:
        ts = []
        for _ in range(args.reps):
            mixed(k)
            ts.append(wall(core.step))
            core.step()
        res[f"mixed-{k}"] = statistics.median(ts)
        print(f"  mixed-{k}: {[round(x, 2) for x in ts]}", flush=True)
    if args.profile.startswith("mixed-"):
        k = int(args.profile.split("-")[1])
        mixed(k)
        print(f"profile of mixed-{k}:")
        table(core.step, args.top)
    res["decode-after"] = statistics.median(wall(core.step) for _ in range(5))
    drop(len(running()))
    for k in news:
        ts = []
        for _ in range(args.reps):
            add(k)
            ts.append(wall(core.step))
            drop(len(running()))
        res[f"prefill-{k}"] = statistics.median(ts)
    for name, ms in res.items():
        print(f"{name:>14s} {ms:9.2f} ms")
    if args.profile.startswith("prefill-"):
        k = int(args.profile.split("-")[1])
        add(k)
        print(f"profile of {args.profile}:")
        table(core.step, args.top)


if __name__ == "__main__":
    main()
