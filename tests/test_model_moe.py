"""MoELayer contract (docs/interfaces.md, model), checkpoint layouts and load errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from eplb.balancer.placement import Placement
from eplb.model import AttentionMetadata, CheckpointReader, MoELayer, load_model
from eplb.model.moe import combine, expert_forward
from eplb.model.tiny import make_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen"))
    ref = make_tiny_checkpoint(path, "qwen3_moe", seed=3, tokenizer=False)
    return path, ref


def _layer(num_experts=6, top_k=2, phy2log=None, ep_rank=0, ep_size=1) -> MoELayer:
    torch.manual_seed(0)
    p2l = torch.arange(num_experts) if phy2log is None else phy2log
    layer = MoELayer(hidden_size=16, intermediate_size=8, num_experts=num_experts, top_k=top_k,
                     norm_topk_prob=True, phy2log=p2l, ep_rank=ep_rank, ep_size=ep_size,
                     dtype=torch.float32, device="cpu", layer_idx=0, moe_idx=0)
    layer.gate_weight.data.normal_()
    for s in range(layer.slot_end - layer.slot_start):
        e = int(p2l[layer.slot_start + s])
        g = torch.Generator().manual_seed(100 + e)  # a replica holds the same weights
        layer.w13.data[s] = torch.randn(16, 16, generator=g) * 0.3
        layer.w2.data[s] = torch.randn(16, 8, generator=g) * 0.3
    return layer


def test_expert_forward_equals_per_token_reference():
    x = torch.randn(37, 16)
    slots = torch.randint(0, 5, (37,))
    w13, w2 = torch.randn(5, 16, 16), torch.randn(5, 16, 8)
    got = expert_forward(x, slots, w13, w2)
    for i in range(37):
        gu = w13[slots[i]] @ x[i]
        want = w2[slots[i]] @ (torch.nn.functional.silu(gu[:8]) * gu[8:])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    assert expert_forward(x[:0], slots[:0], w13, w2).shape == (0, 16)


def test_load_counts_real_tokens_only_and_take_load_zeroes():
    layer = _layer()
    x = torch.randn(10, 16)
    _, ids = layer.route(x)
    layer(x, num_real_tokens=7)
    want = torch.bincount(ids[:7].flatten(), minlength=6)
    assert torch.equal(layer.take_load(), want)
    assert int(layer.expert_load.sum()) == 0
    out = layer(x[:0])  # zero tokens: runs, counts nothing
    assert out.shape == (0, 16) and int(layer.take_load().sum()) == 0


def test_dispatcher_hook_gets_slots_and_combines_in_fixed_order():
    layer = _layer()
    calls = []

    def spy(hidden, slot_ids, weights, expert_fn, lay):
        calls.append((hidden.shape, slot_ids.shape, weights.shape))
        t, k = slot_ids.shape
        y = expert_fn(hidden.repeat_interleave(k, 0), slot_ids.flatten() - lay.slot_start)
        return combine(y.view(t, k, -1), weights)

    x = torch.randn(9, 16)
    want = layer(x)
    layer.install_dispatcher(spy)
    got = layer(x)
    assert calls == [((9, 16), (9, 2), (9, 2))]
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 3), min_size=2, max_size=6),
    tokens=st.integers(0, 40), offset=st.integers(0, 5), seed=st.integers(0, 1000),
)
def test_replica_choice_routes_to_holders_and_spreads_evenly(counts, tokens, offset, seed):
    e = len(counts)
    phy2log = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    phy2log = phy2log[torch.randperm(len(phy2log), generator=torch.Generator().manual_seed(seed))]
    layer = _layer(num_experts=e, top_k=min(2, e), phy2log=phy2log)
    layer.set_replica_offset(offset)
    ids = torch.randint(0, e, (tokens, layer.top_k), generator=torch.Generator().manual_seed(seed))
    slots = layer.choose_slots(ids)
    assert torch.equal(phy2log[slots], ids)  # every pair lands on a slot holding its expert
    for ex in range(e):
        per_slot = torch.bincount(slots[ids == ex], minlength=len(phy2log))[phy2log == ex]
        assert per_slot.numel() == counts[ex]  # every expert has >= 1 replica here
        assert int(per_slot.sum()) == int((ids == ex).sum())
        assert int(per_slot.max() - per_slot.min()) <= 1  # spread evenly over its replicas


def test_redundant_placement_gives_the_same_output():
    base = _layer(num_experts=4)
    x = torch.randn(25, 16)
    want = base(x)
    red = _layer(num_experts=4, phy2log=torch.tensor([2, 0, 1, 3, 2, 0]))
    torch.testing.assert_close(red(x), want, rtol=1e-6, atol=1e-6)
    assert red.log2phy.tolist() == [[1, 5], [2, -1], [0, 4], [3, -1]]
    assert red.replica_count.tolist() == [2, 1, 2, 1]


def test_set_placement_switches_maps():
    layer = _layer(num_experts=3, phy2log=torch.tensor([0, 1, 2, 0]))
    new = torch.tensor([1, 1, 2, 0])
    p = Placement.from_phy2log(new.view(1, -1), 3, 1)
    l2p, cnt = p.log2phy[0], p.replica_count[0]
    layer.set_placement(new, l2p, cnt)
    assert torch.equal(layer.phy2log, new) and torch.equal(layer.log2phy, l2p)
    slots = layer.choose_slots(torch.tensor([[1], [1], [0]]))
    assert slots.flatten().tolist() == [0, 1, 3]


def test_ep_rank_loads_only_its_slots_and_expert_tensors_match_reader(qwen):
    path, _ = qwen
    reader = CheckpointReader(path, dtype=torch.float32)
    phy2log = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 2, 2]])
    model, _ = load_model(path, ep_rank=1, ep_size=2, phy2log=phy2log)
    layers = model.moe_layers()
    assert len(layers) == 2
    for li, layer in enumerate(layers):
        assert (layer.slot_start, layer.slot_end, layer.num_physical) == (5, 10, 10)
        t = layer.expert_tensors()
        assert t["w13"].shape[0] == 5 and t["w2"].shape[0] == 5
        for local in range(5):
            want = reader.expert_tensors(li, int(phy2log[li, 5 + local]))
            assert torch.equal(t["w13"][local], want["w13"]) and torch.equal(t["w2"][local], want["w2"])


def _forward_logits(path, ids):
    model, cfg = load_model(path, max_len=32)
    shape = (1, cfg.num_kv_heads, 32, cfg.head_dim)
    kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    with torch.no_grad():
        return model.compute_logits(model(ids, AttentionMetadata.build([], [(0, 0, len(ids))]), kv))


def test_fused_3d_expert_tensors_and_sharded_index(qwen, tmp_path):
    path, ref = qwen
    ids = torch.arange(3, 20)
    want = ref(ids[None]).logits[0].detach()
    # fused layout: what the transformers 5 module holds (experts.gate_up_proj [E, 2I, H])
    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, str(fused / "model.safetensors"))
    (fused / "config.json").write_text(Path(path, "config.json").read_text())
    assert float((_forward_logits(str(fused), ids) - want).abs().max() / want.abs().max()) < 1e-4
    # sharded: model.safetensors.index.json
    sharded = tmp_path / "sharded"
    ref.save_pretrained(str(sharded), max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert float((_forward_logits(str(sharded), ids) - want).abs().max() / want.abs().max()) < 1e-4


def test_dense_mlp_layers_from_decoder_sparse_step(tmp_path):
    ref = make_tiny_checkpoint(str(tmp_path), "qwen3_moe", tokenizer=False, num_hidden_layers=4,
                               decoder_sparse_step=2, mlp_only_layers=[3])
    model, cfg = load_model(str(tmp_path))
    assert cfg.moe_layers == [1] and [l.layer_idx for l in model.moe_layers()] == [1]
    ids = torch.arange(5, 30)
    want = ref(ids[None]).logits[0].detach()
    assert float((_forward_logits(str(tmp_path), ids) - want).abs().max() / want.abs().max()) < 1e-4


def _copy_ckpt(src: str, dst, mutate_tensors=None, mutate_config=None) -> str:
    dst.mkdir()
    sd = load_file(os.path.join(src, "model.safetensors"))
    if mutate_tensors:
        mutate_tensors(sd)
    save_file(sd, str(dst / "model.safetensors"))
    cfg = json.loads(Path(src, "config.json").read_text())
    if mutate_config:
        mutate_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("case,expect", [
    ("missing_tensor", "model.layers.1.mlp.experts.3.up_proj.weight"),
    ("wrong_shape", "model.layers.0.self_attn.k_proj.weight"),
    ("missing_key", "hidden_size"),
    ("bad_arch", "Qwen3MoeForCausalLM, MixtralForCausalLM, OlmoeForCausalLM"),
])
def test_malformed_checkpoint_errors_name_the_problem(qwen, tmp_path, case, expect):
    path, _ = qwen

    def tensors(sd):
        if case == "missing_tensor":
            del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
        if case == "wrong_shape":
            sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 64)

    def config(c):
        if case == "missing_key":
            del c["hidden_size"]
        if case == "bad_arch":
            c["architectures"] = ["LlamaForCausalLM"]

    bad = _copy_ckpt(path, tmp_path / case, tensors, config)
    with pytest.raises(ValueError, match=expect):
        load_model(bad)


def test_loop_path_equals_grouped_path(monkeypatch):
    import eplb.model.moe as moe

    x = torch.randn(50, 16)
    slots = torch.randint(0, 6, (50,))
    w13, w2 = torch.randn(6, 16, 16), torch.randn(6, 16, 8)
    grouped = expert_forward(x, slots, w13, w2)
    monkeypatch.setattr(moe, "_grouped_mm", None)  # the per-slot loop (used off CPU)
    torch.testing.assert_close(expert_forward(x, slots, w13, w2), grouped, rtol=1e-5, atol=1e-5)


def test_padded_cpu_expert_path_equals_per_token_reference():
    """Enough rows (>= MIN_ROWS) and few slots so the padded batched-GEMM CPU path is taken."""
    from eplb.model.cpu_experts import MIN_ROWS, padded_expert_forward

    g = torch.Generator().manual_seed(7)
    n = MIN_ROWS + 36
    x = torch.randn(n, 16, generator=g)
    slots = torch.randint(0, 4, (n,), generator=g)
    w13, w2 = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    got = padded_expert_forward(x, slots, w13, w2)
    assert got is not None  # the path under test really ran
    torch.testing.assert_close(expert_forward(x, slots, w13, w2), got)
    for i in range(n):
        gu = w13[slots[i]] @ x[i]
        want = w2[slots[i]] @ (torch.nn.functional.silu(gu[:8]) * gu[8:])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)


def _rowwise_expert_fn(layer):
    """The layer's experts one row at a time: a row's result cannot depend on its batch."""
    def fn(x, local_slot):
        return torch.cat([expert_forward(x[i:i + 1], local_slot[i:i + 1], layer.w13, layer.w2)
                          for i in range(x.shape[0])]) if x.shape[0] else x.new_empty(0, x.shape[1])
    return fn


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_load_aware_replica_dispatch_keeps_outputs_identical(tokens):
    phy2log = torch.tensor([2, 0, 1, 3, 2, 0, 2, 1])  # experts 0, 1 twice, 2 three times
    layer = _layer(num_experts=4, phy2log=phy2log)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens))
    _, ids = layer.route(x)
    static_slots = layer.choose_slots(ids)
    want = layer(x)
    layer.set_replica_dispatch("load_aware")
    slots = layer.choose_slots(ids)
    assert torch.equal(phy2log[slots], ids)  # the same logical expert computes every pair
    if tokens > 1:
        assert not torch.equal(slots, static_slots)  # the load-aware split really ran
    # Batched CPU GEMMs round a row differently with other rows beside it, as any change of
    # replica does (test_redundant_placement_gives_the_same_output): equal to rounding.
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    # With a batch-invariant expert kernel the fixed combine order makes them bit-identical.
    layer.expert_fn = _rowwise_expert_fn(layer)
    got = layer(x)
    layer.set_replica_dispatch("static")
    assert torch.equal(layer.choose_slots(ids), static_slots)
    assert torch.equal(got, layer(x))


def test_load_aware_replica_dispatch_model_logits_identical(qwen):
    path, _ = qwen
    phy2log = torch.tensor([[7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 0, 5], [0, 1, 2, 3, 4, 5, 6, 7, 2, 2, 3, 2]])
    model, cfg = load_model(path, max_len=32, phy2log=phy2log)
    ids = torch.arange(3, 28)
    shape = (1, cfg.num_kv_heads, 32, cfg.head_dim)

    def logits():
        kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
        with torch.no_grad():
            return model.compute_logits(model(ids, AttentionMetadata.build([], [(0, 0, len(ids))]), kv))

    for layer in model.moe_layers():
        layer.expert_fn = _rowwise_expert_fn(layer)
    want = logits()
    for layer in model.moe_layers():
        layer.set_replica_dispatch("load_aware")
    assert torch.equal(logits(), want)
