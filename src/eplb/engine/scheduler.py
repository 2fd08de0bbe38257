"""Continuous batching with chunked prefill.

Each step: every running sequence whose prompt is done decodes one token; the rest of the
token budget goes to prefill chunks, first of sequences already admitted, then of waiting
ones admitted while a KV slot is free. A sequence keeps its slot until it finishes, so
nothing is ever preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb.engine.kv_cache import KVCache
from eplb.engine.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    num_computed: int = 0  # tokens whose KV is in the cache
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, if asked
    prompt_logprobs: list | None = None  # [None, TokenLogprob per later prompt token], if asked
    detokenizer: Any = None  # IncrementalDetokenizer of the output, when the model has a tokenizer

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of prompt + output (list slices: a long prefill chunk costs
        no per-token Python call)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:n] + self.output_ids[max(start - n, 0) : end - n]


@dataclass
class ScheduledBatch:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, chunk length)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)


class Scheduler:
    def __init__(self, kv: KVCache, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self, pending: frozenset[str] = frozenset()) -> ScheduledBatch:
        """The next step's batch. ``pending``: request ids of sequences that have sampled a token
        the host has not appended yet (a step launched ahead, before the one in flight ended):
        they count as holding it, so they decode."""
        budget = self.max_num_batched_tokens

        def left(s: Sequence) -> int:
            return s.num_tokens + (s.request_id in pending) - s.num_computed

        decodes = [s for s in self.running if left(s) == 1]
        decodes.sort(key=lambda s: s.slot)  # packed slots -> contiguous decode attention
        budget -= len(decodes)
        prefills: list[tuple[Sequence, int]] = []
        for s in self.running:
            n_left = left(s)
            if n_left > 1 and budget > 0:
                n = min(n_left, budget)
                prefills.append((s, n))
                budget -= n
        while budget > 0 and self.waiting and self.kv.num_free:
            s = self.waiting.popleft()
            s.slot = self.kv.allocate()
            self.running.append(s)
            n = min(s.num_tokens, budget)
            prefills.append((s, n))
            budget -= n
        return ScheduledBatch(decodes, prefills)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.slot)
            seq.slot = -1

    def abort(self, request_id: str) -> Sequence | None:
        for s in self.running:
            if s.request_id == request_id:
                self.finish(s)
                return s
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                return s
        return None
