"""Decode through the static (CUDA-graph) path: padded fixed-size batches give the same tokens
and the same expert load as the plain step; EPLB maps stay in fixed buffers across commits."""

from __future__ import annotations

import pytest
import torch

from eplb.balancer.placement import Placement
from eplb.engine import EngineCore, SamplingParams
from eplb.engine.cuda_graphs import capture_sizes
from model_helpers import static_path_core, tiny_checkpoint_fixture

torch.set_num_threads(1)


path = tiny_checkpoint_fixture(seed=11)


def make_core(path, static: bool, device: str = "cpu", dtype: str = "float32", eager: bool = True,
              max_tokens: int | None = None, budget: int = 64):
    if static:  # the graph runner's padded static forward, run eagerly (no CUDA needed)
        return static_path_core(path, max_tokens=max_tokens, max_num_batched_tokens=budget)
    return EngineCore(path, dtype=dtype, device=device, max_model_len=64, max_num_seqs=6,
                      max_num_batched_tokens=budget, enforce_eager=eager)


def run(core, n_req: int, max_tokens: int = 8) -> dict[str, list[int]]:
    for i in range(n_req):
        core.add_request(f"r{i}", list(range(3 + i, 10 + 2 * i)),
                         SamplingParams(max_tokens=max_tokens + i, temperature=0, ignore_eos=True))
    out = {}
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return out


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    s = capture_sizes(300)
    assert s[:9] == [1, 2, 4, 8, 16, 24, 32, 40, 48] and 80 in s and 96 in s and s[-1] == 300
    assert s == sorted(set(s))


def test_static_decode_matches_plain_step_tokens_and_load(path):
    plain, static = make_core(path, False), make_core(path, True)
    a, b = run(plain, 5), run(static, 5)  # 5 requests: batches of 5, 4, ... pad to 6 and 4
    assert a == b and len(a) == 5
    for lp, ls in zip(plain.model.moe_layers(), static.model.moe_layers()):
        assert torch.equal(lp.expert_load, ls.expert_load)  # padding rows add no load
        assert int(lp.expert_load.sum()) > 0


def test_capture_sizes_of_mixed_steps():
    """Above the decode sizes, multiples of 128 up to max_tokens, which is always in."""
    s = capture_sizes(256, 1024)
    assert s[s.index(256):] == [256, 384, 512, 640, 768, 896, 1024]
    assert capture_sizes(300, 1000)[-7:] == [300, 384, 512, 640, 768, 896, 1000]
    assert capture_sizes(6, 64) == [1, 2, 4, 6, 64]
    assert capture_sizes(6, 6) == capture_sizes(6) == [1, 2, 4, 6]


def count_graph_runs(core) -> dict[str, int]:
    """Wrap the runner's run: counts of decode-only and mixed (sample_rows given) calls."""
    calls = {"decode": 0, "mixed": 0}
    inner = core._graphs.run

    def counted(*a, **kw):
        calls["mixed" if kw.get("sample_rows") is not None else "decode"] += 1
        return inner(*a, **kw)

    core._graphs.run = counted
    return calls


@pytest.mark.parametrize("budget", [64, 9])
def test_mixed_steps_on_the_static_path_match_plain_steps(path, budget, monkeypatch):
    """Steps with prefill chunks (whole prompts at budget 64; chunks that continue a prompt, next
    to decodes, at budget 9) run as rows of the static forward: same tokens and expert load as
    the plain step, and no step of the static engine ran eager."""
    from eplb.model.attention import AttentionMetadata

    plain = make_core(path, False, budget=budget)
    static = make_core(path, True, max_tokens=64, budget=budget)
    a = run(plain, 5)
    calls = count_graph_runs(static)
    eager = []
    build = AttentionMetadata.build
    monkeypatch.setattr(AttentionMetadata, "build", lambda *x, **kw: eager.append(1) or build(*x, **kw))
    b = run(static, 5)
    assert a == b and len(a) == 5
    assert not eager and calls["mixed"] >= (1 if budget == 64 else 6) and calls["decode"] > 0
    for lp, ls in zip(plain.model.moe_layers(), static.model.moe_layers()):
        assert torch.equal(lp.expert_load, ls.expert_load)


def test_mixed_steps_beyond_the_key_read_budget_run_eager(path, monkeypatch):
    from eplb.engine import core as core_module

    monkeypatch.setattr(core_module, "MAX_GRAPH_PREFILL_KEY_READS", 10)
    static = make_core(path, True, max_tokens=64)
    calls = count_graph_runs(static)
    assert run(static, 5) == run(make_core(path, False), 5)
    assert calls["mixed"] == 0 and calls["decode"] > 0


def test_prompt_logprobs_steps_run_eager(path):
    """Prompt log-probabilities need every row's logits: such a step stays off the graph path."""
    static = make_core(path, True, max_tokens=64)
    calls = count_graph_runs(static)
    static.add_request("p", list(range(3, 12)), SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2))
    outs = []
    while static.has_unfinished_requests():
        outs += static.step()
    assert calls["mixed"] == 0 and len(outs[-1].prompt_logprobs) == 9


def test_static_runner_rejects_bad_sample_rows(path):
    core = make_core(path, True, max_tokens=64)
    with pytest.raises(ValueError, match="rows to sample"):
        core._graphs.run([1] * 8, [0] * 8, list(range(8)), sample_rows=list(range(7)))  # > 6 slots
    with pytest.raises(ValueError, match="give sample_rows"):
        core._graphs.run([1] * 8, [0] * 8, list(range(8)))


def test_max_graph_tokens_is_checked(path):
    with pytest.raises(ValueError, match="max_graph_tokens"):
        EngineCore(path, max_model_len=64, max_num_seqs=6, max_num_batched_tokens=64, max_graph_tokens=0)


def test_static_runner_rejects_oversized_batch(path):
    core = make_core(path, True)
    with pytest.raises(ValueError, match="does not fit"):
        core._graphs.run([1] * 7, [0] * 7, [0] * 7)


def test_warm_prefill_leaves_no_trace(path):
    """The startup warm-up forwards (scratch slot, no load) change neither the expert load nor
    any later output; a size above one slot's keys (max_model_len 64) runs as several chunks, so
    every size up to the step budget is warmed."""
    ref = run(make_core(path, False), 3)
    core = make_core(path, False, budget=200)
    seen = []
    inner = core.model.forward

    def forward(ids, meta, *args, **kw):
        seen.append((len(ids), [n for _, _, n in meta.prefills]))
        return inner(ids, meta, *args, **kw)

    core.model.forward = forward
    assert core.warm_prefill() == [1, 2, 4, 8, 16, 32, 64, 128, 200]
    assert seen[-2] == (128, [64, 64]) and seen[-1] == (200, [64, 64, 64, 8])
    assert all(int(l.expert_load.sum()) == 0 for l in core.model.moe_layers())
    core.model.forward = inner
    assert run(core, 3) == ref


def test_warm_eager_decode_one_forward_per_split_plan_and_no_trace(path):
    """One eager decode forward per split plan of the decode-attention kernel (the variants
    eager steps use), each in the scratch slot: no expert load, no later output changed."""
    from eplb.kernels.decode_attention import split_plan

    def make():  # long contexts and many slots: several split plans
        return EngineCore(path, dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=40,
                          max_num_batched_tokens=64, enforce_eager=True)

    ref = run(make(), 3)
    core = make()
    kv_before = [t.clone() for layer in core.kv.layers for t in layer]
    sizes = core.warm_eager_decode()
    cfg = core.config
    plans = [split_plan(b, cfg.num_kv_heads, core.kv.max_len) for b in range(1, core.kv.num_slots + 1)]
    assert sorted(split_plan(b, cfg.num_kv_heads, core.kv.max_len) for b in sizes) == sorted(set(plans))
    assert sizes[0] == 1 and len(sizes) > 3
    assert all(int(l.expert_load.sum()) == 0 for l in core.model.moe_layers())
    scratch = core.kv.scratch_slot
    for before, after in zip(kv_before, (t for layer in core.kv.layers for t in layer)):
        keep = [i for i in range(after.shape[0]) if i != scratch]
        assert torch.equal(before[keep], after[keep])  # only the scratch slot was written
    assert run(core, 3) == ref


def test_warm_up_on_cpu_does_nothing(path, monkeypatch):
    """warm_up() captures graphs and warms prefill only where decode graphs are used: on the CPU
    (eager or not) it runs no forward and says False."""
    for eager in (True, False):
        core = make_core(path, False, eager=eager)
        monkeypatch.setattr(core, "warm_prefill", lambda: pytest.fail("warm_prefill ran on the CPU"))
        monkeypatch.setattr(core, "warm_eager_decode", lambda: pytest.fail("warm_eager_decode ran on the CPU"))
        assert core.warm_up() is False
        assert core._graphs is None


def permute_slots(layer, perm: torch.Tensor) -> None:
    """Move the expert in slot perm[s] to slot s, in place (what an EPLB commit does)."""
    new_p2l = layer.phy2log[perm.to(layer.phy2log.device)].cpu()
    for t in layer.expert_tensors().values():
        t.copy_(t[perm.to(t.device)].clone())
    p = Placement.from_phy2log(new_p2l.view(1, -1), layer.num_experts, 1)
    layer.set_placement(new_p2l, p.log2phy[0], p.replica_count[0])


def test_set_placement_writes_maps_in_place(path):
    core = make_core(path, True)
    layer = core.model.moe_layers()[0]
    ptr = layer.log2phy_buf.data_ptr()
    perm = torch.randperm(layer.num_physical, generator=torch.Generator().manual_seed(0))
    permute_slots(layer, perm)
    assert layer.log2phy_buf.data_ptr() == ptr
    assert torch.equal(layer.phy2log[layer.log2phy[:, 0]], torch.arange(layer.num_experts))


def test_static_decode_after_in_place_commit_same_tokens(path):
    ref = run(make_core(path, True), 3)
    core = make_core(path, True)
    g = torch.Generator().manual_seed(1)
    for layer in core.model.moe_layers():
        permute_slots(layer, torch.randperm(layer.num_physical, generator=g))
    assert run(core, 3) == ref


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_graphs_match_eager_and_survive_commit(path):
    """bf16 on the GPU: graph replays give the eager path's tokens (padded batches may pick other
    cuBLAS kernels, so equality of greedy tokens is checked, not of logits bits), and a placement
    commit after capture (maps and weights changed in place) needs no re-capture."""
    eager = run(make_core(path, False, "cuda", "bfloat16", eager=True), 5)
    core = make_core(path, False, "cuda", "bfloat16", eager=False)
    graphed = run(core, 5)
    assert core._graphs is not None and core._graphs.graphs  # graphs were captured and replayed
    same = sum(a == b for a, b in zip(eager.values(), graphed.values()))
    assert same >= 4, (eager, graphed)
    g = torch.Generator().manual_seed(2)
    for layer in core.model.moe_layers():
        permute_slots(layer, torch.randperm(layer.num_physical, generator=g))
    assert run(core, 5) == graphed


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    from eplb.kernels.pdl import use_pdl

    assert not use_pdl(torch.device("cpu"))
    if torch.cuda.is_available():
        monkeypatch.setenv("EPLB_PDL", "0")
        assert not use_pdl(torch.device("cuda"))


@needs_cuda
def test_pdl_graphs_give_the_tokens_of_plain_launches(path, monkeypatch):
    """Programmatic dependent launch changes when a kernel starts, never what it computes: the
    graphed bf16 decode gives bit-for-bit the same greedy tokens and expert load with PDL on as
    the same graphs captured with ordinary launches (a missing wait would read stale inputs)."""
    from eplb.kernels.pdl import use_pdl

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EPLB_PDL", flag)
        assert use_pdl(torch.device("cuda")) == (flag == "1")
        core = make_core(path, False, "cuda", "bfloat16", eager=False)
        results[flag] = (run(core, 5, max_tokens=24), [layer.expert_load.clone() for layer in core.model.moe_layers()])
        assert core._graphs is not None and core._graphs.graphs
    assert results["1"][0] == results["0"][0]
    assert all(torch.equal(a, b) for a, b in zip(results["1"][1], results["0"][1]))
