"""Dev: flash vs cuDNN SDPA for one causal prefill at Qwen3-30B-A3B's attention shape."""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def ev(fn, n=10):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(n):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[n // 2]

for L in (8192, 2048, 512):
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, L, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fl = 4 * L * L * 32 * 128 / 2
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t = ev(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    print(f"L={L} flash gqa: {t:.3f} ms {fl / t / 1e9:.0f} TF/s")
    ke, ve = k.repeat_interleave(8, 1), v.repeat_interleave(8, 1)
    for gqa in (True, False):
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                kk, vv = (k, v) if gqa else (ke, ve)
                torch.cuda.synchronize(); t0 = time.perf_counter()
                o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                torch.cuda.synchronize(); first = (time.perf_counter() - t0) * 1e3
                t = ev(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa))
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"L={L} cudnn gqa={gqa}: first call {first:.1f} ms, then {t:.3f} ms "
                  f"{fl / t / 1e9:.0f} TF/s rel err {err:.2e}")
        except Exception as exc:
            print(f"L={L} cudnn gqa={gqa}: {type(exc).__name__}: {str(exc)[:200]}")
    # a new length right after: the graph build cost
    L2 = L + 128
    q2 = torch.randn(1, 32, L2, 128, device="cuda", dtype=torch.bfloat16)
    k2 = torch.randn(1, 32, L2, 128, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            F.scaled_dot_product_attention(q2, k2, k2, is_causal=True)
            torch.cuda.synchronize(); print(f"  new length {L2}: first call {(time.perf_counter() - t0) * 1e3:.1f} ms")
    except Exception as exc:
        print("  new length:", type(exc).__name__)
try:
    import inspect

    from torch.nn.attention import varlen
    print("varlen_attn", inspect.signature(varlen.varlen_attn))
except Exception as exc:
    print("no varlen:", exc)
