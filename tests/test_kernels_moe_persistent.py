"""The one-launch decode MoE (``kernels.moe_decode``) gives the bits of the launches it replaces:
``route_logits_topk(..., pair_sort=)`` then ``fused_moe(..., pair_sort=, all_local=True)``.

Runs on CUDA with triton (every SM a program, grid barriers between the phases), or under triton's
interpreter (TRITON_INTERPRET=1, one program running every item), otherwise it skips.
"""

from __future__ import annotations

import pytest
import torch

from eplb.kernels import quantize_block_fp8, triton_test_device

DEV = triton_test_device()
if DEV is None:
    pytest.skip("needs CUDA + triton (or TRITON_INTERPRET=1)", allow_module_level=True)

from eplb.kernels.moe_persistent import moe_decode  # noqa: E402
from eplb.kernels.moe_triton import fused_moe, new_pair_sort  # noqa: E402
from eplb.kernels.routing import route_logits_topk  # noqa: E402

BF16 = torch.bfloat16 if DEV == "cuda" else torch.float32  # the interpreter's bf16 dots are wrong
FP8_OK = DEV == "cuda" and torch.cuda.get_device_capability() >= (8, 9)


def _case(t, h, i, e, s, k, seed, fp8=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(BF16)
    gate = (torch.randn(e, h, generator=g) / h**0.5).to(BF16)
    w13 = torch.randn(s, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(s, h, i, generator=g) / i**0.5
    slot_of = torch.randperm(s, generator=g)[:e]  # one replica per expert, over more slots than experts
    b = torch.randn(e, generator=g).to(BF16) if bias else None
    case = dict(x=x, gate=gate, bias=b, slot_map=slot_of)
    if fp8:
        (q13, s13), (q2, s2) = quantize_block_fp8(w13), quantize_block_fp8(w2)
        case.update(w13=q13, w2=q2, w13_scale=s13, w2_scale=s2)
    else:
        case.update(w13=w13.to(BF16), w2=w2.to(BF16), w13_scale=None, w2_scale=None)
    return {n: v.to(DEV) if v is not None else None for n, v in case.items()}


def _x_fp8(x):
    from eplb.kernels.moe_triton import _quant_act_kernel

    t, h = x.shape
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty((t, h // 128), dtype=torch.float32, device=x.device)
    _quant_act_kernel[(t, h // 128)](x, xq, xs, h, h, h, h // 128, G=1, USE_PDL=False)
    return xq, xs


def _both(c, k, x_fp8=None, num_real=None):
    """(the launches moe_decode replaces, moe_decode): each (out, weights, ids, slots, load)."""
    t, e = c["x"].shape[0], c["gate"].shape[0]
    s = c["w13"].shape[0]
    fp8 = c["w13_scale"] is not None
    load_a = torch.zeros(e, dtype=torch.int64, device=DEV)
    load_b = torch.zeros(e, dtype=torch.int64, device=DEV)
    sort = new_pair_sort(t * k, s, fp8, torch.device(DEV))
    w, ids, slots = route_logits_topk(c["x"], c["gate"], c["bias"], k, True, weight_dtype=c["x"].dtype,
                                      slot_map=c["slot_map"], load=load_a, num_real=num_real, pair_sort=sort)
    out = fused_moe(c["x"], slots, w, c["w13"], c["w2"], w13_scale=c["w13_scale"], w2_scale=c["w2_scale"],
                    x_fp8=x_fp8, all_local=True, pair_sort=sort)
    got = moe_decode(c["x"], c["gate"], c["bias"], k, True, c["w13"], c["w2"], c["slot_map"],
                     w13_scale=c["w13_scale"], w2_scale=c["w2_scale"], x_fp8=x_fp8, load=load_b, num_real=num_real)
    return (out, w, ids, slots, load_a), (*got, load_b)


@pytest.mark.parametrize("t,e,s,k,bias", [(1, 16, 16, 4, False), (3, 32, 40, 8, True), (16, 16, 24, 2, False)])
def test_moe_decode_gives_the_bits_of_the_launches_it_replaces(t, e, s, k, bias):
    c = _case(t, 256, 128, e, s, k, seed=t, bias=bias)
    want, got = _both(c, k, num_real=max(1, t - 1))
    for name, a, b in zip(("out", "weights", "ids", "slots", "load"), want, got):
        assert torch.equal(a.cpu(), b.cpu()), name
    assert int(got[4].sum()) == max(1, t - 1) * k  # the padding row is not load


def test_moe_decode_runs_again_with_the_same_words():
    # the grid barrier's words and the arrival counters reset themselves: a second call agrees
    c = _case(2, 256, 128, 16, 16, 4, seed=7)
    first = moe_decode(c["x"], c["gate"], None, 4, True, c["w13"], c["w2"], c["slot_map"])
    second = moe_decode(c["x"], c["gate"], None, 4, True, c["w13"], c["w2"], c["slot_map"])
    for a, b in zip(first, second):
        assert torch.equal(a.cpu(), b.cpu())


LAUNCHES = [{}, {"prefetch_down": True, "backoff": True}, {"per_sm": 2, "num_stages": 2, "prefetch_down": True}]


@pytest.mark.skipif(not FP8_OK, reason="FP8 tensor-core dots need a CUDA GPU of sm_89 or newer")
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("t,k", [(1, 8), (4, 8), (16, 8)])
def test_moe_decode_fp8_gives_the_bits_of_the_launches_it_replaces(t, k, launch, monkeypatch):
    # full-size shape: H 2048, I 768, 128 experts (the table's TMA tiles apply); each launch shape
    # twice (programs per SM are raised only once the kernel's registers and shared memory are known)
    from eplb.kernels import moe_persistent

    monkeypatch.setattr(moe_persistent, "MOE_DECODE_LAUNCH", {**moe_persistent.MOE_DECODE_LAUNCH, **launch})
    c = _case(t, 2048, 768, 128, 128, k, seed=t, fp8=True)
    for _ in range(2):
        want, got = _both(c, k, x_fp8=_x_fp8(c["x"]))
        for name, a, b in zip(("out", "weights", "ids", "slots", "load"), want, got):
            assert torch.equal(a.cpu(), b.cpu()), name


def test_moe_decode_refuses_what_it_cannot_run():
    c = _case(2, 256, 128, 16, 16, 4, seed=1)
    with pytest.raises(ValueError, match="at most"):
        moe_decode(c["x"].repeat(20, 1), c["gate"], None, 4, True, c["w13"], c["w2"], c["slot_map"])
    with pytest.raises(ValueError, match="slot_map"):
        moe_decode(c["x"], c["gate"], None, 4, True, c["w13"], c["w2"], c["slot_map"].int())
    if DEV == "cuda":
        f = _case(2, 256, 128, 16, 16, 4, seed=1, fp8=True)
        with pytest.raises(ValueError, match="x_fp8"):
            moe_decode(f["x"], f["gate"], None, 4, True, f["w13"], f["w2"], f["slot_map"], w13_scale=f["w13_scale"],
                       w2_scale=f["w2_scale"])


@pytest.mark.parametrize("t", [1, 5, 20])
def test_moe_layer_runs_one_launch_up_to_the_limit(t, monkeypatch):
    """MoELayer.forward (the Triton path forced on under the interpreter) with
    MOE_DECODE_MAX_TOKENS = 16: moe_decode up to 16 tokens, the separate launches beyond; the same
    output and load either way, the router hook run once."""
    from eplb.kernels import moe_persistent as md
    from eplb.model.moe import MoELayer

    e, k, h, i = 32, 4, 256, 128
    layer = MoELayer(hidden_size=h, intermediate_size=i, num_experts=e, top_k=k, norm_topk_prob=True,
                     phy2log=torch.randperm(e, generator=torch.Generator().manual_seed(3)), ep_rank=0, ep_size=1,
                     dtype=BF16, device=DEV, layer_idx=0, moe_idx=0)
    c = _case(t, h, i, e, e, k, seed=t)
    for name in ("gate_weight", "w13", "w2"):
        getattr(layer, name).data.copy_(c["gate" if name == "gate_weight" else name])
    if DEV == "cpu":
        monkeypatch.setattr(MoELayer, "_fused_router", staticmethod(lambda x: x.shape[0] > 0))
        monkeypatch.setattr(MoELayer, "use_fused", lambda self, x: True)
    hooks, calls = [], []
    layer.set_router_skew(torch.zeros(e, dtype=BF16, device=DEV), before_route=lambda: hooks.append(1))
    orig = md.moe_decode
    monkeypatch.setattr(md, "moe_decode", lambda *a, **kw: calls.append(a[0].shape[0]) or orig(*a, **kw))
    want = layer(c["x"], num_real_tokens=t)
    want_load = layer.take_load()
    assert calls == [] and hooks == [1]
    monkeypatch.setattr(md, "MOE_DECODE_MAX_TOKENS", 16)
    got = layer(c["x"], num_real_tokens=t)
    assert calls == ([t] if t <= 16 else []) and hooks == [1, 1]
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(layer.take_load().cpu(), want_load.cpu())
