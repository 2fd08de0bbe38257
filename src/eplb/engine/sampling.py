"""Sampling parameters and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k -1 = off; seed makes one request reproducible on its own."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [B, V] -> one token id per row. Greedy rows take the argmax; others are
    temperature-scaled, top-k then top-p filtered, and drawn with the row's generator."""
    greedy = [p.greedy for p in params]
    if all(greedy):  # argmax needs no float copy: bf16 -> float32 is exact and keeps the order
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, g in enumerate(greedy) if not g]
    x = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
    v = x.shape[1]
    ks = [params[i].top_k if 0 < params[i].top_k < v else v for i in rows]
    if any(k < v for k in ks):
        kth = torch.topk(x, max(ks), dim=-1).values  # [R, maxk] descending
        thr = kth.gather(1, torch.tensor(ks, device=x.device)[:, None] - 1)
        x = x.masked_fill(x < thr, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    tps = [params[i].top_p for i in rows]
    if any(p < 1.0 for p in tps):
        sp, si = probs.sort(dim=-1, descending=True)
        cum = sp.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (cum - sp) >= torch.tensor(tps, device=x.device)[:, None]
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, si, sp)
    probs = probs / probs.sum(-1, keepdim=True)
    cdf = probs.cumsum(-1).cpu()
    for r, i in enumerate(rows):
        u = torch.rand(1, generator=generators[i]) if generators[i] is not None else torch.rand(1)
        idx = int(torch.searchsorted(cdf[r], u * cdf[r, -1]))
        out[i] = min(idx, v - 1)
    return out
