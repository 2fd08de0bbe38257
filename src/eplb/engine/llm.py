"""Offline API in the spirit of vLLM: ``LLM(path).generate(prompts, params)``."""

from __future__ import annotations

from typing import Any

from eplb.engine.core import EngineCore, RequestOutput
from eplb.engine.sampling import SamplingParams


class LLM:
    def __init__(self, model_path: str, **engine_kwargs: Any):
        self.engine = EngineCore(model_path, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(
        self, prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Prompts are strings (tokenized) or token-id lists; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params if params is not None else SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token-id lists instead")
                ids.append(self.tokenizer.encode(p))
            else:
                ids.append(list(p))
        rids = []
        for tok, sp in zip(ids, plist):
            rid = f"llm-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, tok, sp)
            rids.append(rid)
        final: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r] for r in rids]
