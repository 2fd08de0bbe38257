"""The router matmul in the router tail's launch (``kernels.route_logits_topk``) against F.linear
followed by ``route_topk``. Runs on CUDA, or under triton's interpreter (TRITON_INTERPRET=1, as
CI runs it); skips otherwise."""

from __future__ import annotations

import pytest
import torch

from eplb.kernels import triton_test_device

DEV = triton_test_device()
if DEV is None:
    pytest.skip("needs CUDA + triton (or TRITON_INTERPRET=1)", allow_module_level=True)

from eplb.kernels import route_logits_topk, route_topk, routing  # noqa: E402
from eplb.kernels.arrival import arrival_counters  # noqa: E402
from eplb.kernels.moe_triton import new_pair_sort  # noqa: E402

# triton's CPU interpreter gets bf16 dots wrong, so under it the kernels run on float32 data
BF16 = torch.bfloat16 if DEV == "cuda" else torch.float32


def _router_case(t, e, h, bias, seed):
    """x [T, H], gate weight [E, H], bias [E] on a coarse dyadic grid: every float32 sum of their
    products is exact, so the logits have the same bits in any summation order (the fused kernel,
    cuBLAS, numpy) and the fused router must match F.linear + route_topk exactly."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-4, 5, (t, h), generator=g) / 4).to(BF16).to(DEV)
    w = (torch.randint(-4, 5, (e, h), generator=g) / 64).to(BF16).to(DEV)
    b = (torch.randint(-16, 17, (e,), generator=g) / 16).to(BF16).to(DEV) if bias else None
    return x, w, b


def _linear_logits(x, w, b):
    # exact float32 sums (see _router_case) rounded once to x's dtype, as the kernel rounds them
    return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("e", [16, 128])
@pytest.mark.parametrize("t,h", [(1, 96), (5, 200), (16, 256), (29, 600)])  # one H slice, several, a ragged last
def test_route_logits_topk_matches_linear_then_route_topk(t, h, e, bias, renorm):
    k = 4 if e == 16 else 8
    x, w, b = _router_case(t, e, h, bias, seed=t * e + h)
    logits = _linear_logits(x, w, b)
    slot_of = torch.randperm(e, generator=torch.Generator().manual_seed(e)).to(DEV)
    table = torch.full((e, 2), -1, dtype=torch.long, device=DEV)
    table[:, 0] = slot_of
    n = (t + 1) // 2
    for nr in (n, torch.tensor(n, device=DEV)):  # real rows as an int and as a 0-dim device tensor
        load, ref_load = (torch.arange(e, dtype=torch.long, device=DEV) for _ in range(2))
        got = route_logits_topk(x, w, b, k, renorm, weight_dtype=BF16, slot_map=table[:, 0], load=load, num_real=nr)
        want = route_topk(logits, k, renorm, weight_dtype=BF16, slot_map=table[:, 0], load=ref_load, num_real=nr)
        for a, r in zip(got, want):
            assert a.dtype == r.dtype
            if a.is_floating_point() and t > 16:  # one 32-row tail program against route_topk's 16-row
                # ones: the softmax's sum may be reduced in another order, so a rounding apart
                torch.testing.assert_close(a.float().cpu(), r.float().cpu(), rtol=1e-2, atol=0)
            else:
                assert torch.equal(a.cpu(), r.cpu())
        assert torch.equal(load.cpu(), ref_load.cpu())
        assert int((load - torch.arange(e, device=DEV)).sum()) == n * k
    w_only, ids, none = route_logits_topk(x, w, b, k, renorm)  # no map, no load: float32 weights
    assert none is None and w_only.dtype == torch.float32 and torch.equal(ids.cpu(), want[1].cpu())


@pytest.mark.parametrize("t", [1, 16, 23])
def test_route_logits_topk_sorts_the_pairs_as_route_topk_does(t):
    e, s, k, h = 32, 48, 4, 320
    x, w, b = _router_case(t, e, h, True, seed=t)
    slot_of = torch.randperm(s, generator=torch.Generator().manual_seed(t))[:e].to(DEV)
    got_sort, want_sort = (new_pair_sort(t * k, s, False, torch.device(DEV)) for _ in range(2))
    got = route_logits_topk(x, w, b, k, True, weight_dtype=BF16, slot_map=slot_of, pair_sort=got_sort)
    want = route_topk(_linear_logits(x, w, b), k, True, weight_dtype=BF16, slot_map=slot_of, pair_sort=want_sort)
    for a, r in zip(got, want):
        assert torch.equal(a.cpu(), r.cpu())
    used = int(want_sort.num_post.item())
    assert int(got_sort.num_post.item()) == used
    n_blocks = used // want_sort.bm
    assert torch.equal(got_sort.block_slot[:n_blocks].cpu(), want_sort.block_slot[:n_blocks].cpu())
    assert torch.equal(got_sort.counts.cpu(), want_sort.counts.cpu())

    def slot_and_pair(sort):  # a slot's pairs take their ranks from atomics: their order is free
        slot_of_pos = sort.block_slot[:n_blocks].cpu().long().repeat_interleave(sort.bm)
        return (slot_of_pos * (t * k + 1) + sort.sorted_ids[:used].cpu().long()).sort().values

    assert torch.equal(slot_and_pair(got_sort), slot_and_pair(want_sort))


def test_route_logits_topk_row_bits_do_not_depend_on_the_batch():
    """Random data (the sums round): a row gets the same bits in any batch on the same side of 16
    rows (CUDA graphs pad batches, DP ranks batch rows differently). The logits' tiles and order
    never change with T; the tail's program holds 16 rows up to 16 tokens, 32 beyond, and its
    reductions may be laid out differently in the two."""
    t, e, h, k = 29, 128, 600, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g).to(BF16).to(DEV)
    w = (torch.randn(e, h, generator=g) / h**0.5).to(BF16).to(DEV)
    b = torch.randn(e, generator=g).to(BF16).to(DEV)
    fulls = {16: route_logits_topk(x[:16], w, b, k, True, weight_dtype=BF16),
             29: route_logits_topk(x, w, b, k, True, weight_dtype=BF16)}
    for n, full in ((1, 16), (5, 16), (17, 29), (20, 29)):  # each row keeps its place in its 16-row tile
        part = route_logits_topk(x[:n], w, b, k, True, weight_dtype=BF16)
        for got, want in zip(part[:2], fulls[full][:2]):
            assert torch.equal(got.cpu(), want[:n].cpu())
    # alone, a row moves to the tile's first place: numpy's matmul (the interpreter's dot) may give
    # a row other bits at another place in the tile, the GPU's MMA does not
    for r in range(16) if DEV == "cuda" else (0,):
        one = route_logits_topk(x[r:r + 1], w, b, k, True, weight_dtype=BF16)
        for got, want in zip(one[:2], fulls[16][:2]):
            assert torch.equal(got.cpu(), want[r:r + 1].cpu())
    # ids do not depend on the side of 16 (weights may differ by a rounding there)
    assert torch.equal(fulls[16][1].cpu(), fulls[29][1][:16].cpu())
    torch.testing.assert_close(fulls[16][0].float().cpu(), fulls[29][0][:16].float().cpu(), rtol=1e-2, atol=0)


def test_route_logits_topk_resets_its_arrival_counter():
    """Back-to-back launches: the last program ran the tail both times (the load doubles) and left
    its counter at 0."""
    x, w, b = _router_case(29, 64, 300, True, seed=5)
    load = torch.zeros(64, dtype=torch.long, device=DEV)
    first = route_logits_topk(x, w, b, 8, True, load=load)
    second = route_logits_topk(x, w, b, 8, True, load=load)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert torch.equal(load.cpu(), 2 * torch.bincount(first[1].reshape(-1).cpu(), minlength=64))
    assert not arrival_counters(x.device, 1)[:1].any()


def test_route_logits_topk_bad_arguments_raise():
    x, w, _ = _router_case(5, 32, 64, False, seed=0)
    big, _, _ = _router_case(routing.ROUTER_MATMUL_TOKENS_CAP + 1, 32, 64, False, seed=0)
    i32 = torch.zeros(32, dtype=torch.int32, device=DEV)
    bad = [("x", (x[0], w, None, 4)), ("x", (big, w, None, 4)),  # not 2-D; more rows than the cap
           ("gate_weight", (x, w[:, :32], None, 4)),  # H differs
           ("gate_weight", (x, w[:24], None, 4)), ("gate_weight", (x, w.double(), None, 4)),  # E % 16, dtype
           ("bias", (x, w, torch.zeros(31, device=DEV), 4)), ("k", (x, w, None, 33)), ("k", (x, w, None, 0))]
    for name, args in bad:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            route_logits_topk(*args, True)
    with pytest.raises(ValueError, match="^slot_map"):
        route_logits_topk(x, w, None, 4, True, slot_map=i32)
    with pytest.raises(ValueError, match="^load"):
        route_logits_topk(x, w, None, 4, True, load=i32.long()[:31])
    with pytest.raises(ValueError, match="^pair_sort"):  # a sort needs the slot map
        route_logits_topk(x, w, None, 4, True, pair_sort=new_pair_sort(20, 32, False, torch.device(DEV)))
    w0, ids0, _ = route_logits_topk(x[:0], w, None, 4, True)  # no rows: empty outputs, no launch
    assert w0.shape == ids0.shape == (0, 4)


@pytest.mark.parametrize("t,e", [(7, 32), (40, 32), (7, 24)])
def test_moe_layer_routes_through_the_fused_router(t, e, monkeypatch):
    """MoELayer's Triton routing (forced on under the interpreter) with ROUTER_MATMUL_MAX_TOKENS
    set: router matmul and tail in one launch up to that many tokens when E % 16 == 0, cuBLAS +
    route_topk otherwise; before_route runs once per routing; weights, slots and load as F.linear +
    route_topk give them."""
    from eplb.model.moe import MoELayer

    layer = MoELayer(hidden_size=128, intermediate_size=64, num_experts=e, top_k=4, norm_topk_prob=True,
                     phy2log=torch.arange(e), ep_rank=0, ep_size=1, dtype=BF16, device=DEV, layer_idx=0, moe_idx=0)
    x, w, b = _router_case(t, e, 128, True, seed=t + e)
    layer.gate_weight.data.copy_(w)
    hooks, calls = [], []
    layer.set_router_skew(b, before_route=lambda: hooks.append(1))
    orig = routing.route_logits_topk
    monkeypatch.setattr(routing, "route_logits_topk", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    monkeypatch.setattr(routing, "ROUTER_MATMUL_MAX_TOKENS", 32)
    monkeypatch.setattr(MoELayer, "_fused_router", staticmethod(lambda x: x.shape[0] > 0))
    weights, slots, _ = layer._route_fused(x, 5)
    fused = t <= 32 and e % 16 == 0
    assert calls == ([1] if fused else [])
    assert hooks == [1]
    if fused or DEV == "cpu":  # cuBLAS's bf16 logits need not match the exact ones bit for bit
        ref_load = torch.zeros(e, dtype=torch.long, device=DEV)
        want = route_topk(_linear_logits(x, w, b), 4, True, weight_dtype=BF16, slot_map=torch.arange(e, device=DEV),
                          load=ref_load, num_real=5)
        assert torch.equal(weights.cpu(), want[0].cpu()) and torch.equal(slots.cpu(), want[2].cpu())
        assert torch.equal(layer.expert_load.cpu(), ref_load.cpu())


@pytest.mark.parametrize("t", [1, 7, 32])
def test_route_topk_one_row_per_program_routes_the_same(t, monkeypatch):
    """TAIL_ONE_ROW_MAX_TOKENS: the tail's launch with one row per one-warp program picks the same
    experts and counts, and weights within a rounding of the 16-row programs' (another reduction
    layout may sum the softmax's denominator in another order)."""
    e, k = 128, 8
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t)).to(DEV)
    slot_of = torch.randperm(e, generator=torch.Generator().manual_seed(1)).to(DEV)
    loads = [torch.zeros(e, dtype=torch.long, device=DEV) for _ in range(2)]
    monkeypatch.setattr(routing, "TAIL_ONE_ROW_MAX_TOKENS", 0)  # the 16-row programs (on by default up to 32)
    want = route_topk(logits, k, True, weight_dtype=torch.float32, slot_map=slot_of, load=loads[0])
    monkeypatch.setattr(routing, "TAIL_ONE_ROW_MAX_TOKENS", 32)
    got = route_topk(logits, k, True, weight_dtype=torch.float32, slot_map=slot_of, load=loads[1])
    assert torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[2].cpu(), want[2].cpu())
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=1e-6, atol=0)
    assert torch.equal(loads[0].cpu(), loads[1].cpu())
