"""EngineCore: scheduling, sampling, stops, dummy steps, the LLM API and `eplb generate`."""

from __future__ import annotations

import json

import pytest
import torch

from eplb.cli import main as cli_main
from eplb.engine import LLM, EngineCore, SamplingParams
from eplb.engine.sampling import sample
from model_helpers import run_to_completion, tiny_checkpoint_fixture

torch.set_num_threads(1)


path = tiny_checkpoint_fixture(seed=5)


@pytest.fixture(scope="module")
def engine(path):
    return EngineCore(path, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def test_continuous_batching_more_requests_than_slots(engine):
    reqs = [(f"r{i}", list(range(3, 3 + 5 + 3 * i)), greedy(4 + i)) for i in range(9)]
    alone = {rid: run_to_completion(engine, [(rid, ids, p)])[rid].token_ids for rid, ids, p in reqs}
    together = run_to_completion(engine, reqs)
    assert {r: o.token_ids for r, o in together.items()} == alone
    assert all(len(together[f"r{i}"].token_ids) == 4 + i for i in range(9))
    assert engine.kv.num_free == engine.kv.num_slots  # every slot returned


def test_skip_tokenizer_init_gives_ids_only(path, engine):
    """Token ids in and out, no detokenization (the benches' engine-alone runs): the same tokens
    as with the tokenizer (the tiny vocabulary has no ids past the tokenizer), and no text."""
    bare = EngineCore(path, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
                      skip_tokenizer_init=True)
    assert bare.tokenizer is None and engine.tokenizer is not None
    reqs = [(f"r{i}", list(range(4, 12 + i)), greedy(6)) for i in range(3)]
    with_text = run_to_completion(engine, reqs)
    ids_only = run_to_completion(bare, reqs)
    assert {r: o.token_ids for r, o in ids_only.items()} == {r: o.token_ids for r, o in with_text.items()}
    assert all(o.text for o in with_text.values()) and not any(o.text for o in ids_only.values())


def test_each_step_calls_every_moe_layer_once_and_dummy_counts_no_load(engine):
    calls = []
    layers = engine.model.moe_layers()
    orig = [l.dispatcher for l in layers]
    def counting(d):
        def dispatch(h, s, w, f, lay):
            calls.append((lay.moe_idx, h.shape[0]))
            return d(h, s, w, f, lay)
        return dispatch

    for l, d in zip(layers, orig):
        l.install_dispatcher(counting(d))
    try:
        for l in layers:
            l.take_load()
        engine.dummy_step()
        assert calls == [(0, 0), (1, 0)]
        assert all(int(l.take_load().sum()) == 0 for l in layers)
        calls.clear()
        engine.add_request("x", [5, 6, 7, 8, 9], greedy(3))
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        assert [c[0] for c in calls] == [0, 1] * steps
        # 5 prompt tokens + 2 fed-back tokens, top-2 each
        assert all(int(l.take_load().sum()) == 7 * 2 for l in layers)
    finally:
        for l, d in zip(layers, orig):
            l.install_dispatcher(d)


def test_stop_token_ids_eos_and_max_model_len(engine):
    base = run_to_completion(engine, [("b", [4, 5, 6], greedy(10))])["b"].token_ids
    stop_tok = base[3]
    o = run_to_completion(engine, [("s", [4, 5, 6], greedy(10, stop_token_ids=[stop_tok]))])["s"]
    assert o.finish_reason == "stop" and o.token_ids == base[: base.index(stop_tok) + 1]
    engine.eos_token_ids = {stop_tok}
    try:
        o = run_to_completion(engine, [("e", [4, 5, 6], SamplingParams(max_tokens=10, temperature=0))])["e"]
        assert o.finish_reason == "stop" and o.token_ids[-1] == stop_tok
    finally:
        engine.eos_token_ids = set(engine.config.eos_token_ids)
    o = run_to_completion(engine, [("m", list(range(3, 63)), greedy(50))])["m"]
    assert o.finish_reason == "length" and len(o.token_ids) == 4  # 60 + 4 = max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("too-long", list(range(64)), greedy(1))


def test_stop_string_truncates_text(engine):
    o = run_to_completion(engine, [("t", [4, 5, 6], greedy(12))])["t"]
    words = o.text.split()
    assert len(words) >= 4
    stop = words[2]
    first = o.text.find(stop)
    s = run_to_completion(engine, [("u", [4, 5, 6], greedy(12, stop=[stop]))])["u"]
    assert s.finish_reason == "stop" and s.text == o.text[:first]


def _every_step(core, reqs, *, deferred: bool):
    """Each step's outputs of ``reqs`` (rendered after the step when ``deferred``)."""
    core.defer_detokenization(deferred)
    for rid, ids, p in reqs:
        core.add_request(rid, ids, p)
    steps = []
    while core.has_unfinished_requests():
        outs = core.step()
        if deferred:
            if any(not p.stop for _, _, p in reqs):
                assert any(o.text == "" for o in outs)  # left for render_text
            core.render_text()
        steps.append([(o.request_id, o.token_ids, o.text, o.finish_reason) for o in outs])
    core.defer_detokenization(False)
    return steps


def test_deferred_detokenization_gives_the_same_outputs(path):
    """The DP rank detokenizes while the next forward runs: outputs of every step equal the
    in-step ones once rendered, stop strings (decided in the step) included."""
    core = EngineCore(path, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)
    probe = run_to_completion(core, [("p", [4, 5, 6], greedy(12))])["p"].text.split()
    reqs = [("a", [4, 5, 6], greedy(12)), ("b", list(range(3, 11)), greedy(9)),
            ("c", [4, 5, 6], greedy(12, stop=[probe[2]])), ("d", [7, 3], greedy(5))]
    eager = _every_step(core, reqs, deferred=False)
    later = _every_step(core, reqs, deferred=True)
    assert later == eager
    finals = {rid: (text, reason) for step in later for rid, _, text, reason in step if reason is not None}
    assert finals["c"][1] == "stop" and probe[2] not in finals["c"][0]  # the stop string hit, cut
    assert all(text for text, _ in finals.values())


def test_abort_frees_the_slot(engine):
    engine.add_request("a", [3, 4, 5], greedy(30))
    engine.step()
    engine.abort_request("a")
    assert not engine.has_unfinished_requests() and engine.kv.num_free == engine.kv.num_slots


def test_sampler_seed_topk_topp():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    p = [SamplingParams(temperature=0.8, seed=3)] * 4
    a = sample(logits, p, [g() for _ in range(4)])
    b = sample(logits, p, [g() for _ in range(4)])
    assert a == b
    # top_k=1 and a tiny top_p both reduce to greedy
    k1 = sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 4, [g() for _ in range(4)])
    p0 = sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4, [g() for _ in range(4)])
    assert k1 == p0 == logits.argmax(-1).tolist()
    # top_k=5: every draw is among the 5 largest
    top5 = logits.topk(5).indices
    for s in range(20):
        got = sample(logits, [SamplingParams(temperature=2.0, top_k=5)] * 4,
                     [torch.Generator().manual_seed(s) for _ in range(4)])
        assert all(t in top5[i].tolist() for i, t in enumerate(got))


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_kv_budget(path):
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        EngineCore(path, max_model_len=64, kv_cache_memory_bytes=100)
    e = EngineCore(path, max_model_len=64, max_num_seqs=8, kv_cache_memory_bytes=3 * 2 * 2 * 2 * 64 * 16 * 4)
    assert e.kv.num_slots == 3


def test_llm_text_prompts_and_chat_template(path):
    llm = LLM(path, max_model_len=64)
    out = llm.generate(["the cat sat on the mat"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("the cat sat on the mat")
    assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    from eplb.engine.tokenizer import apply_chat_template
    ids = apply_chat_template(llm.tokenizer, [{"role": "user", "content": "hello world"}])
    assert llm.tokenizer.decode(ids) == "user : hello world assistant :"


def test_generate_cli_json(path, capsys):
    rc = cli_main(["generate", path, "--prompt", "the cat sat", "--max-tokens", "6", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"text", "token_ids", "finish_reason"}
    llm = LLM(path)
    want = llm.generate(["the cat sat"], SamplingParams(max_tokens=6, temperature=0))[0]
    assert data["token_ids"] == want.token_ids and data["finish_reason"] == want.finish_reason
    assert cli_main(["generate", path, "--prompt", "x", "--dtype", "int8"]) == 2
    assert "dtype" in capsys.readouterr().err
