"""Dev profiling on the device: where do prefill (8192) and decode (b1, b32) time go? Not a bench."""
import os, sys, tempfile, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from gpu_e2e import qwen3_30b_config
from torch.profiler import ProfilerActivity, profile

torch.backends.cuda.enable_cudnn_sdp(False)
L = int(os.environ.get("LAYERS", "2"))
cfg = qwen3_30b_config(L, False); cfg._experts_implementation = "grouped_mm"
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    from transformers import Qwen3MoeForCausalLM
    hf = Qwen3MoeForCausalLM(cfg).eval()
torch.set_default_dtype(torch.float32)
from eplb.engine.core import EngineCore
from eplb.engine import SamplingParams
with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    core = EngineCore(d, dtype="bfloat16", device="cuda", max_model_len=8192 + 64, max_num_seqs=128, max_num_batched_tokens=8192)
ids = torch.randint(2, cfg.vocab_size, (8192,)).tolist()
def pre():
    core.add_request("p", ids, SamplingParams(max_tokens=1, temperature=0.0))
    while core.has_unfinished_requests(): core.step()
for _ in range(2): pre()
torch.cuda.synchronize(); t0 = time.perf_counter(); pre(); torch.cuda.synchronize()
print(f"ours prefill 8192 x {L} layers: {(time.perf_counter()-t0)*1e3:.1f} ms")
x = torch.tensor([ids], device="cuda")
with torch.no_grad():
    for _ in range(2): hf.model(x)
    torch.cuda.synchronize(); t0 = time.perf_counter(); hf.model(x); torch.cuda.synchronize()
print(f"hf prefill: {(time.perf_counter()-t0)*1e3:.1f} ms")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    pre(); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
for b in (1, 32):
    for i in range(b):
        core.add_request(f"d{i}", torch.randint(2, cfg.vocab_size, (16,)).tolist(), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    for _ in range(4): core.step()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10): core.step()
    torch.cuda.synchronize(); print(f"decode b{b}: {(time.perf_counter()-t0)/10*1e3:.2f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5): core.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
    for i in range(b): core.abort_request(f"d{i}")
