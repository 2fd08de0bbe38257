"""Outputs cross the rank -> front queue as deltas: the front rebuilds exactly the cumulative
outputs the engine produced, whatever their text does, and sends O(new) per step."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.engine.core import RequestOutput
from eplb.engine.sampling import TokenLogprob
from eplb.runtime.output_stream import DeltaDecoder, DeltaEncoder, check_stream_interval


def _lp(t: int) -> TokenLogprob:
    return TokenLogprob(logprob=-0.5 * t, top=[(t, -0.5 * t)])


@st.composite
def request_history(draw):
    """One request's cumulative outputs over its steps: tokens grow by 1+ per step, the text
    grows, or has its tail rewritten (stop strings, the final decode)."""
    prompt = draw(st.lists(st.integers(0, 50), min_size=1, max_size=8))
    with_lps = draw(st.booleans())
    with_prompt_lps = draw(st.booleans())
    steps = draw(st.integers(1, 8))
    tokens: list[int] = []
    text = ""
    outs = []
    for i in range(steps):
        tokens = tokens + draw(st.lists(st.integers(0, 50), min_size=1, max_size=3))
        cut = draw(st.integers(0, len(text)))
        text = text[: cut if draw(st.booleans()) else len(text)] + draw(st.text(max_size=4))
        last = i == steps - 1
        outs.append(RequestOutput(
            "r", prompt, list(tokens), text, last, "stop" if last else None,
            [_lp(t) for t in tokens] if with_lps else None,
            [None] + [_lp(t) for t in prompt[1:]] if with_prompt_lps else None))
    return prompt, outs


@settings(max_examples=200, deadline=None)
@given(request_history())
def test_decoder_rebuilds_every_cumulative_output(history):
    prompt, outs = history
    enc, dec = DeltaEncoder(), DeltaDecoder()
    dec.start("r", prompt)
    for out in outs:
        delta = pickle.loads(pickle.dumps(enc.encode(out)))  # as the queue carries it
        assert dec.apply(delta) == out
    assert len(enc) == 0 and len(dec) == 0  # the finished request is forgotten on both sides


@settings(max_examples=200, deadline=None)
@given(request_history(), st.one_of(st.none(), st.integers(1, 6)))
def test_a_stream_interval_sends_the_first_every_nth_and_the_final_output(history, interval):
    """vLLM's --stream-interval: an output goes out with the first token, then once ``interval``
    tokens have come since the last one sent, and when the request finishes (None: the final
    only); each one sent rebuilds exactly the engine's output of that step."""
    prompt, outs = history
    enc, dec = DeltaEncoder(), DeltaDecoder()
    enc.start("r", interval)
    dec.start("r", prompt)
    sent_at = 0  # tokens in the last output sent
    for out in outs:
        n = len(out.token_ids)
        due = out.finished or (interval is not None and (sent_at == 0 or n - sent_at >= interval))
        delta = enc.encode(out)
        assert (delta is not None) == due
        if delta is not None:
            assert dec.apply(pickle.loads(pickle.dumps(delta))) == out
            sent_at = n
    assert len(enc) == 0 and len(dec) == 0


def test_stream_interval_is_an_integer_from_1_or_none():
    assert check_stream_interval(None) is None and check_stream_interval(4) == 4
    for bad in (0, -1, 2.0, True, "2"):
        try:
            check_stream_interval(bad)
        except ValueError as exc:
            assert "stream_interval" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_deltas_stay_small_and_aborted_requests_are_dropped():
    enc, dec = DeltaEncoder(), DeltaDecoder()
    prompt = list(range(512))
    dec.start("a", prompt)
    sizes = []
    for n in range(1, 201):
        delta = enc.encode(RequestOutput("a", prompt, list(range(n)), "w " * n, False, None))
        sizes.append(len(pickle.dumps(delta)))
        assert dec.apply(delta).token_ids == list(range(n))
    assert max(sizes) < 200 and sizes[-1] - sizes[10] <= 4  # no growth with the length (an int's width)
    dec.forget("a")  # the front aborted it; a late delta changes nothing
    enc.forget("a")
    assert dec.apply(enc.encode(RequestOutput("a", prompt, [1], "x", False, None))) is None
    assert len(dec) == 0
