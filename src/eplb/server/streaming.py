"""Server-sent events, and which part of a choice's growing text is safe to stream."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


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
