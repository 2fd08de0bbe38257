"""Pieces of the server that need no engine: request validation, chat templates, metrics text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from eplb.server.chat_template import FALLBACK_TEMPLATE, ChatFormatter, encode, load_template
from eplb.server.errors import APIError, param_from_loc
from eplb.server.metrics import ServerMetrics, per_rank
from eplb.server.protocol import ChatCompletionRequest, CompletionRequest
from eplb.server.responses import (
    ChatCompletionChunk,
    ChatDelta,
    ChatStreamChoice,
    CompletionChoice,
    CompletionResponse,
)
from eplb.server.streaming import ChunkLines, TextDeltas, sse


def test_completion_request_checks_name_the_param():
    cases = [({"prompt": "x", "max_tokens": 0}, "max_tokens"),
             ({"prompt": "x", "n": 0}, "n"),
             ({"prompt": "x", "n": 1000}, "n"),
             ({"prompt": ["a"] * 100, "n": 2}, "prompt"),
             ({"prompt": "x", "best_of": 3}, "best_of"),
             ({"prompt": "x", "seed": 2**64}, "seed"),
             ({"prompt": "x", "suffix": "y"}, "suffix"),
             ({"prompt": "x", "logprobs": 21}, "logprobs"),
             ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
             ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
             ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
             ({"prompt": "x", "min_p": 1.5}, "min_p"),
             ({"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
             ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
             ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
             ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
             ({"prompt": "x", "stop": ["a"] * 65}, "stop"),
             ({"prompt": "x", "stop_token_ids": [1] * 65}, "stop_token_ids"),
             ({"prompt": "x", "temperature": float("nan")}, "temperature"),
             ({"prompt": "x", "temperature": 2.5}, "temperature"),
             ({"prompt": "x", "top_p": 0}, "top_p"),
             ({"prompt": "x", "top_k": -2}, "top_k"),
             ({"prompt": "x", "stop": ["", "a"]}, "stop"),
             ({"prompt": []}, "prompt")]
    for body, param in cases:
        with pytest.raises(APIError) as info:
            CompletionRequest(**body).check()
        assert info.value.param == param and info.value.status == 400
        assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}


def test_strict_types():
    for body in ({"prompt": "x", "max_tokens": "5"}, {"prompt": "x", "stream": "yes"},
                 {"prompt": 5}, {"prompt": "x", "seed": 1.5}, {"prompt": ["a", 3]}):
        with pytest.raises(ValidationError):
            CompletionRequest(**body)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "wizard", "content": "hi"}])


def test_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


def test_sampling_params_mapping():
    req = CompletionRequest(prompt="a", temperature=0, top_k=0, stop="##", seed=3)
    req.check()
    sp = req.sampling_params(7)
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.stop, sp.seed) == (7, 0.0, -1, ["##"], 3)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5)
    chat.check()
    assert chat.max_tokens == 5


def test_chat_content_parts_are_joined():
    msg = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]).messages[0]
    assert msg.text() == "ab"


def test_param_from_loc():
    assert param_from_loc(("body", "messages", 0, "role")) == "messages.0.role"
    assert param_from_loc(("body", "prompt", "list[int]", 1)) == "prompt.1"
    assert param_from_loc(("body",)) is None


@given(final=st.text(alphabet="ab\ufffd", max_size=12),
       stop=st.text(alphabet="ab", min_size=1, max_size=4),
       tail=st.text(alphabet="ab\ufffd", max_size=6),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_streamed_deltas_never_take_back_and_add_up_to_the_final_text(final, stop, tail, cuts):
    """The engine's text grows as final + stop + tail until the stop string shows up, then it
    is cut to ``final``; a trailing U+FFFD may still turn into another character. Whatever the
    engine reports in between, what was sent is a prefix of the final text, and all of it adds
    up to exactly the final text."""
    if stop in final:  # the engine would have stopped earlier
        return
    full = final + stop + tail
    first_hit = full.find(stop)  # where the engine cuts the text
    final = full[:first_hit]
    deltas = TextDeltas(1, [stop])
    sent = ""
    for m in sorted(cuts):
        partial = full[:m]
        if stop in partial:  # that output would already be the final one
            break
        sent += deltas.delta(0, partial, finished=False)
        assert final.startswith(sent), (sent, final)
    sent += deltas.delta(0, final, finished=True)
    assert sent == final


class _Tok:
    chat_template = None
    eos_token = "</s>"

    def encode(self, text, add_special_tokens=True):
        return ([0] if add_special_tokens else []) + [ord(c) for c in text]


def test_chat_fallback_template_and_custom(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ChatFormatter(_Tok()).render(msgs) == "system: be brief\nuser: hi\nassistant:"
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}")
    f = ChatFormatter(_Tok(), load_template(str(tmpl)))
    assert f.render(msgs) == "<system>be brief<user>hi</s>"
    assert not f.uses_tokenizer_template
    tok = _Tok()
    tok.chat_template = "{{ messages[-1]['content'] }}!"
    f = ChatFormatter(tok)
    assert f.uses_tokenizer_template and f.render(msgs) == "hi!"
    assert FALLBACK_TEMPLATE  # used when a tokenizer has none
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_template("no/such/file.jinja")


def test_encode_handles_both_tokenizer_kinds():
    class Enc:
        ids = [5, 6]

    class Raw:
        def encode(self, text, add_special_tokens=True):
            return Enc()

    assert encode(Raw(), "x") == [5, 6]
    assert encode(_Tok(), "ab", add_special_tokens=False) == [97, 98]


def test_metrics_render_engine_stats():
    stats = {"ranks": [{"running": 2, "waiting": 5}, {"running": 1, "waiting": 0}],
             "rebalances": 4, "rebalances_failed": 1, "copies_moved": 30, "bytes_moved": 4096,
             "last_rebalance_s": 0.25, "mean_rebalance_s": 0.2, "balancedness": 0.93, "steps": 400}
    m = ServerMetrics(lambda: stats)
    m.requests.labels("/v1/completions", "200").inc(3)  # labels as the middleware sets them
    m.generation_tokens.inc(17)
    text = m.render().decode()
    for line in ['eplb_num_requests_waiting{rank="0"} 5.0', 'eplb_num_requests_running{rank="1"} 1.0',
                 "eplb_rebalances_total 4.0", "eplb_rebalances_failed_total 1.0",
                 "eplb_expert_copies_moved_total 30.0", "eplb_expert_bytes_moved_total 4096.0",
                 "eplb_last_rebalance_seconds 0.25", "eplb_mean_rebalance_seconds 0.2",
                 "eplb_balancedness 0.93", "eplb_engine_steps_total 400.0",
                 'eplb_requests_total{endpoint="/v1/completions",status="200"} 3.0',
                 "eplb_generation_tokens_total 17.0"]:
        assert line in text, line
    assert "_created" not in text


def test_metrics_survive_a_failing_engine():
    def boom():
        raise RuntimeError("engine gone")

    assert "eplb_requests_total" in ServerMetrics(boom).render().decode()
    assert per_rank({"running": [1, 2]}, "running") == [1.0, 2.0]
    assert per_rank({}, "running") == []


@given(rid=st.text(max_size=12), model=st.text(max_size=12), created=st.integers(0, 2**40),
       index=st.integers(0, 300), text=st.text(max_size=40) | st.none(),
       finish=st.sampled_from([None, "stop", "length"]))
def test_chunk_lines_are_the_models_sse_lines_byte_for_byte(rid, model, created, index, text, finish):
    """The streaming fast path serializes exactly what the response models do (any text: quotes,
    control characters, non-ASCII, surrogates)."""
    head = {"id": rid, "created": created, "model": model}
    completion = sse(CompletionResponse(**head, choices=[CompletionChoice(
        index=index, text=text or "", finish_reason=finish)]).body())
    assert ChunkLines(head, chat=False).line(index, text or "", finish) == completion
    chat = sse(ChatCompletionChunk(**head, choices=[ChatStreamChoice(
        index=index, delta=ChatDelta(content=text), finish_reason=finish)]).body())
    assert ChunkLines(head, chat=True).line(index, text, finish) == chat
