"""Tokenizer loading (transformers' fast-tokenizer helpers over tokenizer.json) and chat prompts.

A folder with no tokenizer.json but an ``id_tokenizer.json`` (the configs of models served with
dummy weights, whose real tokenizers cannot be shipped) gets an :class:`IdTokenizer`: every id of
the vocabulary is a word ``t<id>``, so any generated id detokenizes and streams.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

ID_TOKENIZER_FILE = "id_tokenizer.json"


class IdTokenizer:
    """One word per token id: ``decode([5, 9]) == "t5 t9"``; ``encode`` maps a word ``t<N>``
    (N < vocab_size) to N and any other word to the ids of its UTF-8 bytes (so every text has
    some encoding; only ``t<N>`` words round-trip). No special tokens, no chat template."""

    chat_template = None
    bos_token = None
    eos_token = None
    _word = re.compile(r"t(\d+)")

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"{ID_TOKENIZER_FILE}: vocab_size must be an integer >= 256, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self._words: list[str] | None = None  # "t0".."t{V-1}", built at the first decode

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        for word in text.split():
            m = self._word.fullmatch(word)
            if m and int(m.group(1)) < self.vocab_size:
                ids.append(int(m.group(1)))
            else:
                ids.extend(word.encode())
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # the engine re-decodes a request's whole output every step: a list lookup per id keeps
        # that cheap (~30 ns a token)
        if self._words is None:
            self._words = [f"t{i}" for i in range(self.vocab_size)]
        return " ".join(map(self._words.__getitem__, ids))


def load_tokenizer(path: str) -> Any | None:
    """The checkpoint's tokenizer (chat template from tokenizer_config.json), an
    :class:`IdTokenizer` when the folder has only ``id_tokenizer.json``, or None."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        id_path = os.path.join(path, ID_TOKENIZER_FILE)
        if not os.path.exists(id_path):
            return None
        with open(id_path) as f:
            spec = json.load(f)
        vocab = spec.get("vocab_size")
        if vocab is None:  # default: the model's vocabulary
            with open(os.path.join(path, "config.json")) as f:
                vocab = json.load(f).get("vocab_size")
        return IdTokenizer(vocab)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` with the generation prompt appended."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template (tokenizer_config.json 'chat_template')")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)
