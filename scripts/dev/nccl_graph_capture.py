"""Can torch.distributed's NCCL collectives be captured in a CUDA graph here? One process, world
size 1 (the capture path of ProcessGroupNCCL is the same as with more ranks). Prints only."""
import os

import torch
import torch.distributed as dist

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
gathered = torch.empty(64, 2048, device="cuda", dtype=torch.bfloat16)
scattered = torch.empty(64, 2048, device="cuda", dtype=torch.bfloat16)


def body():
    dist.all_gather_into_tensor(gathered, x)
    dist.reduce_scatter_tensor(scattered, gathered * 2)


s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    body()
torch.cuda.current_stream().wait_stream(s)
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    body()
x.copy_(torch.randn_like(x))
g.replay()
torch.cuda.synchronize()
print("NCCL capture ok:", torch.equal(gathered, x), torch.equal(scattered, x * 2))
dist.destroy_process_group()
