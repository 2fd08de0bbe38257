"""The single-process engine: KV cache, scheduler, sampler, EngineCore and the offline LLM API."""

from eplb.engine.core import EngineCore, RequestOutput
from eplb.engine.llm import LLM
from eplb.engine.sampling import SamplingParams

__all__ = ["EngineCore", "LLM", "RequestOutput", "SamplingParams"]
