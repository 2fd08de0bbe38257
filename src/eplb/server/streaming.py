"""Server-sent events, and which part of a choice's growing text is safe to stream."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

from eplb.server.responses import ChatCompletionChunk, CompletionResponse

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {_dumps(obj)}\n\n"


class ChunkLines:
    """The SSE line of a stream chunk that carries one choice's new text and no log-probabilities
    (nearly every chunk), as ``sse(CompletionResponse(...).body())`` or
    ``sse(ChatCompletionChunk(...).body())`` gives it, byte for byte (tests/test_server_unit.py
    checks), built from the response's head serialized once. Per streamed token the pydantic
    models and the walk over their dict were most of the front's CPU (bench/front.py)."""

    def __init__(self, head: dict[str, Any], chat: bool) -> None:
        model = ChatCompletionChunk if chat else CompletionResponse
        fields = {"id": head["id"], "object": model.model_fields["object"].default, "created": head["created"],
                  "model": head["model"]}
        self._prefix = "data: " + _dumps(fields)[:-1] + ',"choices":[{"index":'
        self._chat = chat

    def line(self, index: int, text: str | None, finish_reason: str | None) -> str:
        """``text``: the new text (chat: None sends an empty delta)."""
        finish = "null" if finish_reason is None else _json_str(finish_reason)
        if self._chat:
            body = '"delta":{}' if text is None else '"delta":{"content":' + _json_str(text) + "}"
        else:
            body = '"text":' + _json_str(text)
        return f'{self._prefix}{index},{body},"logprobs":null,"finish_reason":{finish}}}]}}\n\n'


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps's defaults (ensure_ascii) otherwise
_dumps = _ENCODER.encode
_json_str = encode_basestring_ascii  # what the encoder writes for a str, without its dispatch


def holdback(stops: list[str]) -> int:
    """Characters a stream keeps back so a half-generated stop string is never sent."""
    return max((len(s) for s in stops), default=1) - 1


class TextDeltas:
    """Turns each choice's cumulative text (as the engine reports it) into the deltas to send.

    While a choice runs, its last ``holdback`` characters may still become part of a stop string
    (and be cut), and a trailing U+FFFD may be a multi-byte character whose other bytes are still
    to come; both are held back until the choice finishes. So the deltas always add up to the
    final text, and nothing sent is ever taken back."""

    def __init__(self, num_choices: int, stops: list[str]) -> None:
        self.holdback = holdback(stops)
        self.sent = [0] * num_choices  # characters already streamed, per choice

    def delta(self, choice: int, text: str, finished: bool) -> str:
        start = self.sent[choice]
        end = len(text) if finished else max(
            start, min(len(text) - self.holdback, len(text.rstrip("\ufffd"))))
        self.sent[choice] = max(start, end)
        return text[start:end]
