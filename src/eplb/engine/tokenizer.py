"""Tokenizer loading (transformers' fast-tokenizer helpers over tokenizer.json) and chat prompts."""

from __future__ import annotations

import os
from typing import Any


def load_tokenizer(path: str) -> Any | None:
    """The checkpoint's tokenizer (chat template from tokenizer_config.json), or None if it has none."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
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
