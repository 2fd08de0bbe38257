"""Prompts -> token ids, off the event loop, with the length checks done before the costly part.

Tokenizing (and rendering a chat template) runs in the server's own small thread pool, so a large
prompt never blocks the event loop (``/health`` keeps answering) and never takes the threads that
run the sync endpoints. A text longer than ``max_model_len`` tokens could possibly be is refused
without being tokenized at all.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from eplb.engine.prompt import check_prompt_ids
from eplb.server.chat_template import ChatFormatter, encode
from eplb.server.errors import APIError

# NFC and friends can merge a few characters into one before tokenizing: a safety factor on the
# "every token is at most the longest vocabulary entry" bound
NORMALIZATION_SLACK = 4


def vocab_size(tok: Any) -> int | None:
    """Token count of a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    if hasattr(tok, "get_vocab_size"):
        return int(tok.get_vocab_size())
    try:
        return len(tok)
    except TypeError:
        return None


def longest_token_chars(tok: Any) -> int | None:
    """Characters of the longest vocabulary entry (byte-level entries spell one char per byte,
    so no decoded token is longer); None when the tokenizer does not list its vocabulary."""
    try:
        vocab = tok.get_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without a vocab map: no check
        return None
    return max((len(k) for k in vocab), default=None)


class Preprocessor:
    def __init__(self, tokenizer: Any, formatter: ChatFormatter | None, max_model_len: int,
                 vocab: int | None, pool: ThreadPoolExecutor) -> None:
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.max_model_len = max_model_len
        self.vocab_size = vocab
        longest = longest_token_chars(tokenizer) if tokenizer is not None else None
        self.max_chars = (None if longest is None
                          else max_model_len * longest * NORMALIZATION_SLACK)
        self.pool = pool
        self._token_text: dict[int, str] = {}

    async def _off_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def _check_chars(self, text: str, param: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(f"the prompt has {len(text)} characters, more than {self.max_model_len} "
                           f"tokens of this tokenizer can spell (--max-model-len)", param=param,
                           code="context_length_exceeded")

    async def prompt_ids(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a completions prompt (text or ids), checked against the vocabulary."""
        if isinstance(prompt, list):
            ids = prompt
            # (a too-long list is refused by check_lengths with its own code: do not scan it here)
            if ids and len(ids) < self.max_model_len:
                try:
                    check_prompt_ids(ids, self.max_model_len, self.vocab_size)
                except ValueError as exc:
                    raise APIError(str(exc), param=param) from None
            return ids
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer; send the prompt as token ids", param=param)
        self._check_chars(prompt, param)
        return await self._off_loop(encode, self.tokenizer, prompt)

    async def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        if self.tokenizer is None or self.formatter is None:
            raise APIError("this model has no tokenizer, so chat is unavailable; use "
                           "/v1/completions with token ids", param="messages")
        self._check_chars("".join(m["content"] for m in messages), "messages")
        fmt = self.formatter

        def render_and_encode() -> list[int]:
            try:
                text = fmt.render(messages, add_generation_prompt)
            except Exception as exc:  # noqa: BLE001 - the template itself may reject a conversation
                raise APIError(f"chat template failed: {exc}", param="messages") from None
            self._check_chars(text, "messages")
            return encode(self.tokenizer, text, add_special_tokens=not fmt.uses_tokenizer_template)

        return await self._off_loop(render_and_encode)

    async def decode(self, ids: list[int]) -> str:
        """Text of token ids (echo of a token-id prompt)."""
        if self.tokenizer is None:
            return ""
        return await self._off_loop(self.tokenizer.decode, ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """The text of one token, for log-probabilities (cached: a single-token decode)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = (self.tokenizer.decode([token_id]) if self.tokenizer is not None
                    else f"token_id:{token_id}")
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def check_lengths(self, n: int, max_tokens: int | None, default: int | None,
                      param: str) -> int:
        """max_tokens to use for a prompt of ``n`` tokens (400 naming the field if it cannot fit)."""
        limit = self.max_model_len
        if n == 0:
            raise APIError("the prompt is empty", param=param)
        if n >= limit:
            raise APIError(f"the prompt has {n} tokens; this model's maximum context length is "
                           f"{limit} tokens (--max-model-len), which leaves no room to generate",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return min(default, limit - n) if default is not None else limit - n
        if n + max_tokens > limit:
            raise APIError(f"this model's maximum context length is {limit} tokens, but the "
                           f"prompt has {n} and max_tokens is {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens
