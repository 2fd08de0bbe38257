"""Dev bench (GPU): per-layer elementwise cost of a Qwen3-30B-A3B decoder layer at 8192 tokens,
torch path vs the fused Triton kernels (eplb.kernels.norm_rope), and how many output elements of
each kernel variant differ from torch. Not a test; prints a small report.

Per layer the torch path runs: the residual add + rms_norm before attention, q/k head norm + RoPE,
the residual add + rms_norm before the MLP. The fused path: rms_norm_fused(residual=) twice and
qk_norm_rope once.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
from eplb.kernels import norm_rope  # noqa: E402
from eplb.model.transformer import Rope  # noqa: E402

N, H, HQ, HKV, D, EPS = int(os.environ.get("TOKENS", "8192")), 2048, 32, 4, 128, 1e-6
DT = torch.bfloat16
dev = "cuda"


def torch_rms(x, w, residual=None):
    if residual is not None:
        x = residual + x
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=EPS).to(x.dtype), x


def torch_qk(qkv, qw, kw, cos, sin):
    n = qkv.shape[0]
    qk = qkv[:, : (HQ + HKV) * D].reshape(n, HQ + HKV, D)
    w = torch.cat([qw.expand(HQ, D), kw.expand(HKV, D)])
    qk = w * F.rms_norm(qk.float(), (D,), eps=EPS).to(qk.dtype)
    qk = Rope.apply(qk, cos, sin)
    return qk[:, :HQ], qk[:, HQ:]


def timeit(fn, iters=50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main() -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(N, H, device=dev)).to(DT)
    res = torch.randn(N, H, device=dev).to(DT)
    w = (1 + 0.2 * torch.randn(H, device=dev)).to(DT)
    qkv = (2 * torch.randn(N, (HQ + 2 * HKV) * D, device=dev)).to(DT)
    qw = (1 + 0.2 * torch.randn(D, device=dev)).to(DT)
    kw = (1 + 0.2 * torch.randn(D, device=dev)).to(DT)
    rope = Rope(D, 1e6, N + 64, dev)
    pos = torch.arange(N, device=dev)
    cos, sin = rope.tables(pos, DT)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, N={N}")

    ref_out, ref_r = torch_rms(x, w, res)
    ref_q, ref_k = torch_qk(qkv, qw, kw, cos, sin)
    for exact, fma, threads in [(True, True, 128), (True, False, 128), (True, True, 256), (False, True, 128)]:
        norm_rope.EXACT, norm_rope._TORCH_FMA, norm_rope._TORCH_THREADS = exact, fma, threads
        out, r = norm_rope.rms_norm_fused(x, w, EPS, res)
        q, k, _ = norm_rope.qk_norm_rope(qkv, qw, kw, cos, sin, None, HQ, HKV, D, EPS)
        print(f"variant exact={exact} fma={fma} threads={threads}: rms out differs {(out != ref_out).sum().item()}"
              f" / {out.numel()} (sum differs {(r != ref_r).sum().item()}), q differs {(q != ref_q).sum().item()},"
              f" k differs {(k != ref_k).sum().item()}, max |dq| {(q.float() - ref_q.float()).abs().max().item():.3g}")
    norm_rope.EXACT, norm_rope._TORCH_FMA, norm_rope._TORCH_THREADS = True, True, 128
    # where a q/k mismatch would come from: RoPE alone, norm alone (cos = 1, sin = 0)
    qk = qkv[:, : (HQ + HKV) * D].reshape(N, HQ + HKV, D)
    q, k, _ = norm_rope.qk_norm_rope(qkv, None, None, cos, sin, None, HQ, HKV, D, EPS)
    want = Rope.apply(qk, cos, sin)
    print(f"rope only: q differs {(q != want[:, :HQ]).sum().item()}, k differs {(k != want[:, HQ:]).sum().item()}")
    one, zero = torch.ones_like(cos), torch.zeros_like(sin)
    q, k, _ = norm_rope.qk_norm_rope(qkv, qw, kw, one, zero, None, HQ, HKV, D, EPS)
    wq = qw * F.rms_norm(qk[:, :HQ].float(), (D,), eps=EPS).to(DT)
    print(f"norm only: q differs {(q != wq).sum().item()}")
    q, k, _ = norm_rope.qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, HQ, HKV, D, EPS)
    print(f"fp32 table + positions: q differs {(q != ref_q).sum().item()}, k differs {(k != ref_k).sum().item()}")

    sweep = {}
    for nw in (1, 2, 4, 8):
        norm_rope.NUM_WARPS_RMS = nw
        sweep[f"fused add+rms_norm nw={nw}"] = timeit(lambda: norm_rope.rms_norm_fused(x, w, EPS, res))
        for bh in (4, 8, 16):
            norm_rope.NUM_WARPS_QK, norm_rope.QK_HEADS_PER_PROGRAM = nw, bh
            sweep[f"fused qk norm+rope nw={nw} bh={bh}"] = timeit(
                lambda: norm_rope.qk_norm_rope(qkv, qw, kw, cos, sin, None, HQ, HKV, D, EPS))
    norm_rope.NUM_WARPS_RMS = norm_rope.NUM_WARPS_QK = norm_rope.QK_HEADS_PER_PROGRAM = None
    for k_, v_ in sweep.items():
        print(f"  {k_:45s} {v_ * 1e3:8.1f} us")

    t = {}
    t["torch add+rms_norm"] = timeit(lambda: torch_rms(x, w, res))
    t["torch rms_norm (no add)"] = timeit(lambda: torch_rms(x, w))
    t["torch qk norm+rope"] = timeit(lambda: torch_qk(qkv, qw, kw, cos, sin))
    t["torch Rope.tables (per forward)"] = timeit(lambda: rope.tables(pos, DT))
    for exact in (True, False):
        norm_rope.EXACT = exact
        tag = "exact" if exact else "plain-sum"
        t[f"fused add+rms_norm [{tag}]"] = timeit(lambda: norm_rope.rms_norm_fused(x, w, EPS, res))
        t[f"fused rms_norm (no add) [{tag}]"] = timeit(lambda: norm_rope.rms_norm_fused(x, w, EPS))
        t[f"fused qk norm+rope [{tag}]"] = timeit(
            lambda: norm_rope.qk_norm_rope(qkv, qw, kw, cos, sin, None, HQ, HKV, D, EPS))
        t[f"fused qk norm+rope, fp32 table+pos [{tag}]"] = timeit(
            lambda: norm_rope.qk_norm_rope(qkv, qw, kw, rope.cos, rope.sin, pos, HQ, HKV, D, EPS))
    norm_rope.EXACT = True
    for k_, v_ in t.items():
        print(f"  {k_:45s} {v_ * 1e3:8.1f} us")
    before = 2 * t["torch add+rms_norm"] + t["torch qk norm+rope"]
    for tag in ("exact", "plain-sum"):
        after = 2 * t[f"fused add+rms_norm [{tag}]"] + t[f"fused qk norm+rope [{tag}]"]
        print(f"per layer elementwise (2x add+norm + qk norm/rope): torch {before * 1e3:.0f} us -> fused "
              f"[{tag}] {after * 1e3:.0f} us ({before / after:.2f}x)")
    print(f"fused add+rms_norm effective bandwidth (x, res read; out, r written): "
          f"{4 * N * H * 2 / (t['fused add+rms_norm [exact]'] * 1e-3) / 1e9:.0f} GB/s")


def layer_bench() -> None:
    """One DecoderLayer at Qwen3-30B-A3B's attention shape (a dense MLP of 6144 stands in for
    the MoE block), an N-token prefill: forward time and outputs with and without the kernels."""
    from eplb.model import transformer
    from eplb.model.attention import AttentionMetadata
    from eplb.model.config import ModelConfig

    torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = ModelConfig(architecture="Qwen3MoeForCausalLM", family="qwen3_moe", vocab_size=1000,
                      hidden_size=H, num_layers=1, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                      num_experts=1, top_k=1, moe_intermediate_size=768, intermediate_size=6144,
                      norm_topk_prob=True, rms_norm_eps=EPS, rope_theta=1e6, max_position_embeddings=N + 64,
                      tie_word_embeddings=False, attention_bias=False, qk_norm="head", clip_qkv=None,
                      moe_layers=[])
    torch.manual_seed(1)
    layer = transformer.DecoderLayer(cfg, transformer.DenseMLP(H, 6144, DT, dev), DT, dev)
    with torch.no_grad():
        for prm in layer.parameters():
            prm.copy_(torch.randn_like(prm, dtype=torch.float32).mul_(0.02).to(DT))
        for nrm in (layer.input_norm, layer.post_norm, layer.attn.q_norm, layer.attn.k_norm):
            nrm.copy_((1 + 0.1 * torch.randn_like(nrm, dtype=torch.float32)).to(DT))
    rope = Rope(D, 1e6, N + 64, dev)
    meta = AttentionMetadata.build([], [(0, 0, N)], dev)
    cos, sin = rope.tables(meta.positions, DT)
    kv = (torch.zeros(1, HKV, N + 64, D, dtype=DT, device=dev), torch.zeros(1, HKV, N + 64, D, dtype=DT, device=dev))
    x = torch.randn(N, H, device=dev).to(DT)
    res = torch.randn(N, H, device=dev).to(DT)
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            transformer.FUSED_NORM_ROPE = fused
            outs[fused] = layer(x, res, cos, sin, meta, kv)
            ms = timeit(lambda: layer(x, res, cos, sin, meta, kv), iters=20)
            on = "on " if fused else "off"
            print(f"DecoderLayer forward (dense MLP 6144), {N} tokens, kernels {on}: {ms:.3f} ms")
    transformer.FUSED_NORM_ROPE = True
    same = all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    print(f"layer outputs (mlp out, residual) bit-identical with/without kernels: {same}")


if __name__ == "__main__":
    main()
    layer_bench()
