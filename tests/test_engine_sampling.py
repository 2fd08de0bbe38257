"""The batched sampler: no NaN and no id outside the tokenizer whatever the settings, penalties /
logit bias / min_tokens against a plain per-row reference, log-probabilities, seeded rows
independent of their batch, and the engine's use of it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.engine import EngineCore, SamplingParams
from eplb.engine.sampling import Sampler, SampleRow
from eplb.model.tiny import make_tiny_checkpoint
from model_helpers import run_to_completion

torch.set_num_threads(1)
V = 40


def _rows(params, slot0=0, num_generated=0, prompt=(1, 2, 3), seeds=True):
    return [SampleRow(p, torch.Generator().manual_seed(i) if seeds else None, slot0 + i,
                      list(prompt), num_generated) for i, p in enumerate(params)]


@pytest.mark.parametrize("kw", [dict(temperature=1e-45), dict(temperature=1e-300),
                                dict(temperature=1e-38), dict(temperature=1e-6),
                                dict(top_p=1e-300), dict(top_p=1e-45, temperature=2.0),
                                dict(temperature=1e-5, top_p=1e-300, top_k=3)])
def test_tiny_temperature_or_top_p_is_the_argmax(kw):
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1))
    tokens, _ = Sampler(V, set(), 6, "cpu")(logits, _rows([SamplingParams(**kw)] * 6))
    assert tokens == logits.argmax(-1).tolist()


def test_padding_ids_and_nan_rows_never_come_out():
    logits = torch.randn(4, V + 8)
    logits[:, V:] = 1e4  # the embedding's padding rows: the model's favourite
    logits[3] = float("nan")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.7, top_p=0.5, top_k=5, min_p=0.1),
              SamplingParams(temperature=1.0)]
    for seed in range(5):
        tokens, _ = Sampler(V, set(), 4, "cpu", torch.Generator().manual_seed(seed))(
            logits, _rows(params))
        assert all(0 <= t < V for t in tokens)


def _reference(logits, rows, counts, prompt_sets, eos):
    """Per row, per token, in plain Python: what _process must do."""
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for t, b in (p.logit_bias or {}).items():
            out[i, t] += b
        if r.num_generated < p.min_tokens:
            for t in set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos):
                out[i, t] = -math.inf
        for t in range(out.shape[1]):
            c = counts[i].get(t, 0)
            x = out[i, t].item()
            if p.uses_penalties:
                if c > 0 or t in prompt_sets[i]:
                    x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
                x -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
            out[i, t] = x
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_processing_matches_a_per_row_reference(data):
    b = data.draw(st.integers(1, 4))
    params, prompts, histories = [], [], []
    for _ in range(b):
        params.append(SamplingParams(
            max_tokens=8, temperature=0,
            presence_penalty=data.draw(st.sampled_from([0.0, 0.5, -1.0, 2.0])),
            frequency_penalty=data.draw(st.sampled_from([0.0, 0.3, -0.7])),
            repetition_penalty=data.draw(st.sampled_from([1.0, 1.3, 0.6])),
            min_tokens=data.draw(st.integers(0, 3)),
            stop_token_ids=data.draw(st.lists(st.integers(0, V - 1), max_size=2)) or None,
            logit_bias=data.draw(st.dictionaries(st.integers(0, V - 1),
                                                 st.floats(-100, 100), max_size=3)) or None))
        prompts.append(data.draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=6)))
        histories.append(data.draw(st.lists(st.integers(0, V - 1), max_size=5)))
    sampler = Sampler(V, {0}, b, "cpu")
    # replay each row's history through the sampler's own counting (forcing the tokens)
    steps = max((len(h) for h in histories), default=0)
    for s in range(steps + 1):
        rows = [SampleRow(p, None, i, prompts[i], min(s, len(histories[i])))
                for i, p in enumerate(params)]
        logits = torch.randn(b, V, generator=torch.Generator().manual_seed(s))
        x = logits.clone()
        sampler._process(x, rows)
        counts = [{t: histories[i][:rows[i].num_generated].count(t) for t in range(V)}
                  for i in range(b)]
        want = _reference(logits, rows, counts, [set(p) for p in prompts], {0})
        assert torch.allclose(x, want, atol=1e-4), (s, x - want)
        # count the next history token of each row the way __call__ does
        live = [i for i in range(b) if s < len(histories[i]) and params[i].uses_penalties]
        if live:
            sampler._counts.index_put_(
                (torch.tensor(live), torch.tensor([histories[i][s] for i in live])),
                torch.ones(len(live), dtype=torch.int32), accumulate=True)


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logprobs=3, logit_bias={5: 50.0}),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0.9, logprobs=0, repetition_penalty=2.0)]
    ref = torch.log_softmax(logits, -1)  # before the bias and the penalty
    tokens, lps = Sampler(V, set(), 3, "cpu")(logits, _rows(params))
    assert tokens[0] == 5
    assert lps[1] is None and lps[2].top == []
    assert lps[0].logprob == pytest.approx(ref[0, tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in lps[0].top] == ref[0].topk(3).indices.tolist()
    assert lps[2].logprob == pytest.approx(ref[2, tokens[2]].item(), abs=1e-5)


def test_a_seeded_row_draws_the_same_alone_or_in_a_batch():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, top_k=20, seed=9)
    alone, _ = Sampler(V, set(), 5, "cpu")(logits[2:3], [SampleRow(p, torch.Generator().manual_seed(9))])
    rows = [SampleRow(SamplingParams(temperature=t), None) for t in (0, 0.5)] + \
        [SampleRow(p, torch.Generator().manual_seed(9))] + \
        [SampleRow(SamplingParams(temperature=1.0, presence_penalty=1.0), None, 3, [1]),
         SampleRow(SamplingParams(temperature=0.3, logit_bias={4: 3.0}), None)]
    together, _ = Sampler(V, set(), 5, "cpu", torch.Generator().manual_seed(0))(logits, rows)
    assert together[2] == alone[0]


def test_logit_bias_and_min_tokens_steer_greedy():
    logits = torch.zeros(2, V)
    logits[:, 0] = 5.0  # eos is the favourite
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}),
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])]
    logits[1, 1] = 4.0
    tokens, _ = Sampler(V, {0}, 2, "cpu")(logits, _rows(params))
    assert tokens[0] == 7 and tokens[1] not in (0, 1)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("tiny"))
    make_tiny_checkpoint(p, "qwen3_moe", seed=5)
    return EngineCore(p, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)


def test_engine_penalties_reset_with_the_slot_and_do_not_touch_others(engine):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    pen = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                         presence_penalty=2.0, repetition_penalty=1.5, logprobs=2)
    base = run_to_completion(engine, [("a", [4, 5, 6], plain)])["a"]
    alone = run_to_completion(engine, [("b", [4, 5, 6], pen)])["b"]
    # the same slot again, now among others: identical tokens, and the others unchanged
    mixed = run_to_completion(engine, [("c", [4, 5, 6], pen), ("d", [4, 5, 6], plain), ("e", [7, 8], pen)])
    assert mixed["c"].token_ids == alone.token_ids
    assert mixed["d"].token_ids == base.token_ids
    assert alone.token_ids != base.token_ids  # penalties this strong change the greedy text
    assert base.logprobs is None and len(alone.logprobs) == 12
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in alone.logprobs)


def test_engine_min_tokens_holds_back_eos(engine):
    eos = sorted(engine.eos_token_ids)[0]
    p = SamplingParams(max_tokens=6, temperature=0, min_tokens=4, logit_bias={eos: 100.0})
    out = run_to_completion(engine, [("m", [4, 5, 6], p)])["m"]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and out.finish_reason == "stop"


def test_prompt_logprobs_score_each_prompt_token_across_chunks(tmp_path_factory, engine):
    path = str(tmp_path_factory.mktemp("tiny_pl"))
    make_tiny_checkpoint(path, "qwen3_moe", seed=5)
    whole = EngineCore(path, dtype="float32", max_model_len=64, max_num_seqs=4,
                       max_num_batched_tokens=64)
    prompt = [4, 5, 6, 7, 8, 9, 10, 11]
    # the model's own greedy continuation, appended to the prompt: at those positions the
    # prompt token is the argmax, so its logprob is the top one (a shift by one would show)
    gen = run_to_completion(whole, [("g", prompt, SamplingParams(max_tokens=12, temperature=0,
                                                    ignore_eos=True))])["g"].token_ids
    long_prompt = prompt + gen  # 20 tokens: two chunks of 16 in ``engine``
    p = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=2)
    a = run_to_completion(engine, [("a", long_prompt, p)])["a"].prompt_logprobs
    b = run_to_completion(whole, [("b", long_prompt, p)])["b"].prompt_logprobs
    assert len(a) == len(b) == len(long_prompt) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    for i in range(len(prompt), len(long_prompt)):
        assert a[i].top[0][0] == long_prompt[i]
        assert a[i].logprob == pytest.approx(a[i].top[0][1], abs=1e-6)
