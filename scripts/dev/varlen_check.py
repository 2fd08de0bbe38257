"""Dev: torch.nn.attention.varlen.varlen_attn with GQA and causal window vs per-sequence SDPA."""
import time
import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

torch.manual_seed(0)
hq, hkv, d = 8, 4, 64
lens = [16, 300, 512, 77, 129, 400, 250, 33]
n = sum(lens)
q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
def per_seq():
    out = torch.empty_like(q); off = 0
    for c in lens:
        o = F.scaled_dot_product_attention(q[off:off+c].transpose(0, 1)[None], k[off:off+c].transpose(0, 1)[None],
                                           v[off:off+c].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        out[off:off+c] = o[0].transpose(0, 1); off += c
    return out
ref = per_seq()
try:
    o = varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0))
    print("varlen gqa rel err", ((o.float() - ref.float()).norm() / ref.float().norm()).item())
except Exception as exc:
    print("varlen gqa failed:", type(exc).__name__, str(exc)[:300])
    ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    o = varlen_attn(q, ke, ve, cu, cu, max(lens), max(lens), window_size=(-1, 0))
    print("varlen expanded rel err", ((o.float() - ref.float()).norm() / ref.float().norm()).item())
for name, f in (("per_seq", per_seq), ("varlen", lambda: varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0)))):
    try:
        for _ in range(3): f()
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(20): f()
        torch.cuda.synchronize(); print(name, (time.perf_counter() - t0) / 20 * 1e3, "ms (host+gpu)")
    except Exception as exc:
        print(name, "failed", type(exc).__name__)
