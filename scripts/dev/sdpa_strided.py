"""Dev: does cuDNN SDPA take a strided q view (q heads inside a [N, Hq+Hkv, D] buffer) at full speed?"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

L, hq, hkv, d = 8192, 32, 4, 128
qk = torch.randn(L, hq + hkv, d, device="cuda", dtype=torch.bfloat16)
kc = torch.randn(2, hkv, L + 64, d, device="cuda", dtype=torch.bfloat16)
for name, q in (("strided", qk[:, :hq].transpose(0, 1).unsqueeze(0)), ("contig", qk[:, :hq].transpose(0, 1).unsqueeze(0).contiguous())):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        f = lambda: F.scaled_dot_product_attention(q, kc[:1, :, :L], kc[1:, :, :L], is_causal=True, enable_gqa=True)
        for _ in range(3): f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5): f()
            torch.cuda.synchronize()
    print(name, p.key_averages().table(sort_by="self_cuda_time_total", row_limit=4, max_name_column_width=60))
