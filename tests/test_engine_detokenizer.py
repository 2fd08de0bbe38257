"""Incremental detokenization (eplb.engine.detokenizer) against decoding the whole output."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.engine.detokenizer import IncrementalDetokenizer
from eplb.engine.tokenizer import IdTokenizer, load_tokenizer
from eplb.resources import default_model_path

SHIPPED = load_tokenizer(default_model_path())  # byte-level BPE, as Qwen's
ID = IdTokenizer(1000)
# multi-byte characters, so that some tokens hold part of a character
TEXTS = st.text(alphabet=st.sampled_from(list("abc xyz.,\n") + ["é", "ß", "中", "文", "😀", "\u00a0"]),
                max_size=60)


def check_running_text_is_a_prefix(tokenizer, ids: list[int], chunks: list[int]) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    n = 0
    for size in chunks:  # one or more tokens per step, as steps with several new tokens would
        n = min(len(ids), n + size)
        text = detok.update(ids[:n])
        assert full.startswith(text), (ids[:n], text, full)
        # it lags the whole decode only by a character still incomplete
        assert text == tokenizer.decode(ids[:n], skip_special_tokens=True).rstrip("\ufffd")[:len(text)]
        if n == len(ids):
            break
    assert detok.finish(ids) == full


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, chunks=st.lists(st.integers(1, 3), min_size=1, max_size=80))
def test_shipped_tokenizer_running_text_is_a_prefix_of_the_full_decode(text, chunks):
    ids = SHIPPED.encode(text, add_special_tokens=False)
    check_running_text_is_a_prefix(SHIPPED, ids, chunks + [len(ids)])


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, len(SHIPPED) - 1), max_size=40))
def test_shipped_tokenizer_any_ids(ids):
    # arbitrary ids (special tokens, byte fragments that never complete a character)
    check_running_text_is_a_prefix(SHIPPED, ids, [1] * len(ids) + [1])


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.integers(0, 999), max_size=50))
def test_id_tokenizer_running_text_equals_the_full_decode(ids):
    detok = IncrementalDetokenizer(ID)
    for n in range(1, len(ids) + 1):
        assert detok.update(ids[:n]) == ID.decode(ids[:n])


def test_waits_for_a_split_character_then_emits_it():
    ids = SHIPPED.encode("a😀b", add_special_tokens=False)
    detok = IncrementalDetokenizer(SHIPPED)
    texts = [detok.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == SHIPPED.decode(ids, skip_special_tokens=True)


class CountingTokenizer:
    """Counts the ids each decode call reads."""

    def __init__(self, inner):
        self.inner = inner
        self.ids_read = 0

    def decode(self, ids, skip_special_tokens=False):
        self.ids_read += len(ids)
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_does_not_grow_with_the_output():
    # the point of it: a long output costs the same per step as a short one (the whole-output
    # decode read n ids at step n: 500 steps -> 125,250 ids)
    tok = CountingTokenizer(ID)
    detok = IncrementalDetokenizer(tok)
    ids = list(range(500))
    for n in range(1, 501):
        detok.update(ids[:n])
    assert tok.ids_read <= 4 * 500
    assert detok.text == ID.decode(ids)
