"""Sampling parameters and the batched sampler.

The sampler works on the whole batch at once on the logits' device: every per-request setting
becomes a row of a tensor, and the only host transfer is the final one of the chosen ids (and the
log-probabilities when a request asks for them). Order, as vLLM's: raw log-probabilities ->
logit bias, min_tokens, penalties -> greedy argmax / temperature, min_p, top-k, top-p and an
exponential race (``argmax(p / q)``, ``q ~ Exp(1)``: one draw per row, per-row generators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# vLLM's _SAMPLING_EPS: below this temperature a request is greedy (dividing by it overflows)
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    """temperature < 1e-5 = greedy; top_k -1 = off; seed makes one request reproducible on its own.
    Penalties follow vLLM: presence/frequency over generated tokens, repetition over prompt and
    generated tokens. ``logprobs``: None = off, k = the chosen token's plus the k most likely."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not _is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if self.logit_bias is not None and not all(
            _is_int(k) and k >= 0 and _is_num(v) and abs(v) <= MAX_LOGIT_BIAS
            for k, v in self.logit_bias.items()
        ):
            raise ValueError(f"logit_bias must map token ids >= 0 to numbers in [-100, 100], "
                             f"got {self.logit_bias!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got "
                             f"{self.prompt_logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def processes_logits(self) -> bool:
        """True when something besides temperature/top-k/top-p/min-p changes the logits."""
        return self.uses_penalties or bool(self.logit_bias) or self.min_tokens > 0


@dataclass
class TokenLogprob:
    """Log-probability of a generated token and the ``k`` most likely tokens at its position
    (from the model's raw logits, as vLLM's default ``raw_logprobs``)."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    generator: torch.Generator | None
    slot: int = -1  # the KV slot: row of the penalty state
    prompt_ids: list[int] | None = None  # given on the sequence's first sample
    num_generated: int = 0


class Sampler:
    """Batched sampler with the penalty state of every KV slot (allocated on first use).

    ``valid_vocab`` is the tokenizer's size: logits rows are cut to it, so padding ids of the
    embedding matrix can never be chosen."""

    def __init__(self, valid_vocab: int, eos_token_ids: set[int], num_slots: int,
                 device: torch.device | str, generator: torch.Generator | None = None) -> None:
        self.valid_vocab = int(valid_vocab)
        self.eos_token_ids = sorted(eos_token_ids)
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.generator = generator
        self._counts: torch.Tensor | None = None  # [slots, V] generated-token counts
        self._prompt_mask: torch.Tensor | None = None  # [slots, V] token occurs in the prompt

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]
                 ) -> tuple[list[int], list[TokenLogprob | None]]:
        tokens = self.sample_tokens(logits, rows)
        v = min(self.valid_vocab, logits.shape[1])
        logits = logits[:, :v]
        params = [r.params for r in rows]
        want_lp = [i for i, p in enumerate(params) if p.logprobs is not None]
        lps: list[TokenLogprob | None] = [None] * len(rows)
        if want_lp:
            idx = torch.tensor(want_lp, device=logits.device)
            lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
            chosen = lp.gather(1, tokens[idx][:, None])[:, 0]
            k = max(params[i].logprobs for i in want_lp)
            top = lp.topk(k, dim=-1) if k > 0 else None
            chosen_l = chosen.tolist()
            top_v = top.values.tolist() if top is not None else [[]] * len(want_lp)
            top_i = top.indices.tolist() if top is not None else [[]] * len(want_lp)
            for j, i in enumerate(want_lp):
                kk = params[i].logprobs
                lps[i] = TokenLogprob(chosen_l[j], list(zip(top_i[j][:kk], top_v[j][:kk])))
        return tokens.tolist(), lps

    def sample_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """The sampled ids [B] on the device (penalty counts updated there too). Greedy rows
        without logit processing need no host synchronisation (one argmax); the general path
        copies its per-row parameters to the device."""
        v = min(self.valid_vocab, logits.shape[1])
        logits = logits[:, :v]
        params = [r.params for r in rows]
        if all(p.greedy and not p.processes_logits for p in params):
            tokens = logits.argmax(dim=-1)  # bf16 -> float32 is exact: no copy for argmax
        else:
            tokens = self._sample(logits, rows)
        pen = [i for i, p in enumerate(params) if p.uses_penalties]
        if pen:  # count the new tokens on the device, before their slots are freed
            slots = torch.tensor([rows[i].slot for i in pen], device=logits.device)
            idx = torch.tensor(pen, device=logits.device)
            self._counts.index_put_((slots, tokens[idx]), torch.ones_like(slots, dtype=torch.int32),
                                    accumulate=True)
        return tokens

    # -- the general path -----------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        dev = logits.device
        params = [r.params for r in rows]
        # a copy (even of float32 logits): the processing below writes in place, and the raw
        # logits stay for the log-probabilities
        x = logits.to(torch.float32, copy=True)
        self._process(x, rows)
        x = _finite(x)
        greedy_ids = x.argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if not rand:
            return greedy_ids
        ridx = torch.tensor(rand, device=dev)
        xr = x.index_select(0, ridx) / torch.tensor(
            [params[i].temperature for i in rand], device=dev, dtype=torch.float32)[:, None]
        xr = _finite(xr)
        v = xr.shape[1]
        ks = [params[i].top_k if 0 < params[i].top_k < v else v for i in rand]
        if any(k < v for k in ks):
            kth = torch.topk(xr, max(ks), dim=-1).values  # [R, maxk] descending
            thr = kth.gather(1, torch.tensor(ks, device=dev)[:, None] - 1)
            xr = xr.masked_fill(xr < thr, float("-inf"))
        probs = torch.softmax(xr, dim=-1)
        min_ps = [params[i].min_p for i in rand]
        if any(m > 0 for m in min_ps):
            m = torch.tensor(min_ps, device=dev, dtype=torch.float32)[:, None]
            probs = probs.masked_fill(probs < m * probs.amax(-1, keepdim=True), 0.0)
        tps = [params[i].top_p for i in rand]
        if any(p < 1.0 for p in tps):
            sp, si = probs.sort(dim=-1, descending=True)
            cum = sp.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p; the most likely token always
            # stays (a top_p that underflows float32 to 0 would otherwise drop every token)
            drop = (cum - sp) >= torch.tensor(tps, device=dev, dtype=torch.float32)[:, None]
            drop[:, 0] = False
            probs = torch.zeros_like(probs).scatter_(1, si, sp.masked_fill(drop, 0.0))
        # a row whose logits were all -inf or NaN has no distribution: its argmax stays in range
        probs = torch.nan_to_num(probs, nan=0.0)
        q = torch.empty_like(probs)
        shared = [j for j, i in enumerate(rand) if rows[i].generator is None]
        for j, i in enumerate(rand):
            if rows[i].generator is not None:
                q[j].exponential_(generator=rows[i].generator)
        if shared:
            q_shared = torch.empty(len(shared), v, device=dev).exponential_(generator=self.generator)
            q.index_copy_(0, torch.tensor(shared, device=dev), q_shared)
        drawn = (probs / q).argmax(dim=-1)
        return greedy_ids.index_copy(0, ridx, drawn)

    def _process(self, x: torch.Tensor, rows: list[SampleRow]) -> None:
        """Logit bias, min_tokens and penalties, in place on the float32 logits ``x``."""
        dev, v = x.device, x.shape[1]
        br, bt, bv = [], [], []  # logit bias: row, token, value
        mr, mt = [], []  # min_tokens: row, token to mask
        pen: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if t < v:
                        br.append(i), bt.append(t), bv.append(float(b))
            if r.num_generated < p.min_tokens:
                stops = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(self.eos_token_ids))
                for t in stops:
                    if t < v:
                        mr.append(i), mt.append(t)
            if p.uses_penalties:
                pen.append(i)
        if br:
            x.index_put_((torch.tensor(br, device=dev), torch.tensor(bt, device=dev)),
                         torch.tensor(bv, device=dev), accumulate=True)
        if mr:
            x.index_put_((torch.tensor(mr, device=dev), torch.tensor(mt, device=dev)),
                         torch.tensor(float("-inf"), device=dev))
        if pen:
            self._penalize(x, rows, pen)

    def _penalize(self, x: torch.Tensor, rows: list[SampleRow], pen: list[int]) -> None:
        dev, v = x.device, x.shape[1]
        if self._counts is None:
            self._counts = torch.zeros(self.num_slots, v, dtype=torch.int32, device=dev)
            self._prompt_mask = torch.zeros(self.num_slots, v, dtype=torch.bool, device=dev)
        for i in pen:  # a sequence's first sample: reset its slot's state
            r = rows[i]
            if r.num_generated == 0:
                self._counts[r.slot].zero_()
                self._prompt_mask[r.slot].zero_()
                ids = torch.tensor([t for t in (r.prompt_ids or ()) if t < v], dtype=torch.long,
                                   device=dev)
                self._prompt_mask[r.slot].index_fill_(0, ids, True)
        slots = torch.tensor([rows[i].slot for i in pen], device=dev)
        idx = torch.tensor(pen, device=dev)
        counts = self._counts.index_select(0, slots)
        seen = (counts > 0) | self._prompt_mask.index_select(0, slots)
        ps = [rows[i].params for i in pen]
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev)[:, None]
        y = x.index_select(0, idx)
        y = torch.where(seen, torch.where(y > 0, y / rep, y * rep), y)
        y = y - freq * counts - pres * (counts > 0)
        x.index_copy_(0, idx, y)


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int, valid_vocab: int
                   ) -> list[TokenLogprob]:
    """Row i of ``logits``: the log-probability of ``targets[i]`` (raw log-softmax over the whole
    row: a prompt may hold any embedding id) and the ``k`` most likely tokens of the tokenizer."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(c, []) for c in chosen]
    top = lp[:, :valid_vocab].topk(min(k, valid_vocab), dim=-1)
    return [TokenLogprob(c, list(zip(i, v)))
            for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]


def _finite(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf and +inf -> a large finite value, so softmax never sees inf - inf."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=1e30, neginf=float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] -> one token id per row (no penalty state: every row's first token)."""
    sampler = Sampler(logits.shape[1], set(), len(params), logits.device)
    rows = [SampleRow(p, g, slot=i, prompt_ids=[]) for i, (p, g) in enumerate(zip(params, generators))]
    return sampler(logits, rows)[0]
