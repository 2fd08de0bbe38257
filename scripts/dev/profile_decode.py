"""Where a full-size decode step's time goes: per-kernel GPU time of one CUDA-graph replay.

One GPU run, prints only (not a bench of record):
    PYTHONPATH=src python3 scripts/dev/profile_decode.py --dtypes bf16,fp8 --batches 1,32

Per dtype and batch: the step time (CUDA events around ``EngineCore.step()``, median), the replay
time of the captured graph alone, and a torch.profiler table of the kernels of a few replays
(name, launches per step, microseconds per step), so host gaps (step - replay) and the sum of
kernel time (vs replay) can be told apart.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu  # noqa: E402  (bench/gpu.py: timed)

CONFIGS = {"bf16": os.path.join(ROOT, "configs", "Qwen3-30B-A3B"),
           "fp8": os.path.join(ROOT, "configs", "Qwen3-30B-A3B-FP8")}


def kernel_table(fn, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            p = per[ev.name[:90]]
            p[0] += 1
            p[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    total = sum(v[1] for v in per.values()) / steps
    launches = sum(v[0] for v in per.values()) / steps
    print(f"    kernels per step: {launches:.0f}, kernel time per step {total / 1e3:.3f} ms")
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"    {us / steps:9.1f} us  {n / steps:6.1f}x  {name}")


@torch.inference_mode()
def run(kind: str, batches: list[int], args) -> None:
    from eplb.engine.core import EngineCore
    from eplb.engine.sampling import SamplingParams

    core = EngineCore(CONFIGS[kind], load_format="dummy", dtype="bfloat16", device="cuda",
                      max_model_len=args.prompt_len + 128, max_num_seqs=max(batches),
                      max_num_batched_tokens=8192, skip_tokenizer_init=True)
    core.warm_up()
    graphs = core._decode_graphs()
    vocab = core.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for b in batches:
        for i in range(b):
            core.add_request(f"{b}-{i}", torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist(),
                             SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        seqs = list(core._seqs.values())
        while any(s.num_computed < len(s.prompt_ids) for s in seqs):
            core.step()
        for _ in range(3):
            core.step()
        step_ms = gpu.timed(core.step, reps=15, warmup=0) * 1e3
        bs = graphs.sizes[[s >= b for s in graphs.sizes].index(True)]
        replay_ms = gpu.timed(graphs.graphs[bs].replay, reps=20, warmup=0) * 1e3
        print(f"[{kind}] batch {b}: step {step_ms:.3f} ms, graph replay {replay_ms:.3f} ms "
              f"(host/sampling gap {step_ms - replay_ms:.3f} ms)", flush=True)
        print("  replay:")
        kernel_table(graphs.graphs[bs].replay, 3, args.top)
        print("  the same forward, eager (kernel times as in the graph, if the replay shows none):")
        kernel_table(lambda: graphs._forward(bs), 3, args.top)
        print("  whole step:")
        kernel_table(core.step, 3, 12)
        for s in seqs:
            core.abort_request(s.request_id)
        core.step()
    del core
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    for kind in args.dtypes.split(","):
        run(kind, [int(b) for b in args.batches.split(",")], args)


if __name__ == "__main__":
    main()
