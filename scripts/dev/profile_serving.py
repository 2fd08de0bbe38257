"""Dev: where does bench/engine.py's serving time go on the GPU? Step counts and time by kind."""
import os, sys, tempfile, time, collections
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
import engine as be
from eplb.engine import EngineCore, SamplingParams
from eplb.model.testing import make_tiny_checkpoint

with tempfile.TemporaryDirectory() as d:
    make_tiny_checkpoint(d, "qwen3_moe", seed=0, tokenizer=False, **be.SHAPE)
    reqs = be.workload(128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, be.SHAPE["vocab_size"], (pl,), generator=g).tolist() for pl, _ in reqs]
    eng = EngineCore(d, dtype="bfloat16", device="cuda", max_model_len=800, max_num_seqs=32, max_num_batched_tokens=2048)
    eng.capture_cuda_graphs()
    print("tokenizer:", eng.tokenizer is not None)
    for i, (p, (_, ol)) in enumerate(zip(prompts, reqs)):
        eng.add_request(f"s{i}", p, SamplingParams(max_tokens=ol, temperature=0, ignore_eos=True))
    kinds = collections.Counter(); times = collections.defaultdict(float)
    sched = eng.scheduler.schedule
    state = {}
    def spy():
        b = sched(); state["kind"] = "decode" if not b.prefills else ("prefill" if not b.decodes else "mixed"); return b
    eng.scheduler.schedule = spy
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        ts = time.perf_counter(); eng.step(); torch.cuda.synchronize()
        kinds[state["kind"]] += 1; times[state["kind"]] += time.perf_counter() - ts
    print("total", time.perf_counter() - t0)
    for k in kinds: print(k, kinds[k], "steps", f"{times[k]:.2f} s", f"{times[k] / kinds[k] * 1e3:.2f} ms/step")

    # second pass with the profiler: the same workload again (kernels compiled by now)
    if os.environ.get("PROFILE"):
        from torch.profiler import ProfilerActivity, profile
        for i, (p, (_, ol)) in enumerate(zip(prompts[:48], reqs[:48])):
            eng.add_request(f"t{i}", p, SamplingParams(max_tokens=ol, temperature=0, ignore_eos=True))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            while eng.has_unfinished_requests():
                eng.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
