"""The few-shot prompt format shared by training, the GSM8K client and the engine checks.

It is the format of vLLM's ``tests/evals/gsm8k/gsm8k_eval.py``::

    Question: <q>\\nAnswer: <worked answer ending in #### N>\\n\\n   (one block per shot)
    Question: <q>\\nAnswer:

The model continues after ``Answer:`` and is stopped at the next ``Question:`` or blank line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

STOP_STRINGS = ["Question:", "\n\n"]
INVALID = None

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def format_shot(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}\n\n"


def build_prompt(shots: Sequence[dict], question: str) -> str:
    """shots: records with ``question`` and ``answer``; returns the full prompt text."""
    return "".join(format_shot(s["question"], s["answer"]) for s in shots) + (
        f"Question: {question}\nAnswer:"
    )


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    """The number after ``####`` if there is one, else the last number in the text, else None."""
    if "####" in text:
        after = text.split("####", 1)[1]
        match = _NUMBER.search(after)
        if match:
            return _to_number(match.group())
    numbers = _NUMBER.findall(text)
    if numbers:
        return _to_number(numbers[-1])
    return INVALID


def reference_answer(answer_field: str) -> float:
    """The ground-truth number of a GSM8K ``answer`` field (what follows ``####``)."""
    value = extract_answer(answer_field.split("####")[-1]) if "####" in answer_field else None
    if value is None:
        raise ValueError(f"answer has no '#### N' line: {answer_field[-80:]!r}")
    return value
