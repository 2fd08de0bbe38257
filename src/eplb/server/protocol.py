"""OpenAI request models, their validation, and the OpenAI-style error body.

Every rejection is an ``APIError`` (HTTP 400 unless said otherwise) whose ``param`` names the field;
the app turns it into ``{"error": {"message", "type", "param", "code"}}``.
Fields the OpenAI API has but we do not implement are accepted only at their neutral value.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class APIError(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code if code is not None else str(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, param=self.param, type=self.type, code=self.code)


def error_body(message: str, *, param: str | None = None, type: str = "invalid_request_error",
               code: str | None = "400") -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields common to completions and chat; strict types so "5" is not silently a 5."""

    # unknown OpenAI fields (user, logit_bias=None, ...) are ignored like vLLM does
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    ignore_eos: StrictBool = False  # vLLM extension, handy for load tests

    def check_common(self) -> None:
        if self.n != 1:
            raise APIError(f"n must be 1 (only one choice per prompt is supported), got {self.n}",
                           param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise APIError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise APIError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise APIError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}", param="top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(f"{name} is not supported; leave it unset or 0", param=name)
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if any(s == "" for s in stops):
                raise APIError("stop strings must be non-empty", param="stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int) -> Any:
        """An ``eplb.engine.SamplingParams`` (imported here so the protocol has no torch import)."""
        from eplb.engine import SamplingParams

        top_k = self.top_k if self.top_k not in (None, 0) else -1
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=top_k,
            seed=self.seed,
            stop=self.stop_list() or None,
            ignore_eos=self.ignore_eos,
        )


PromptType = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise APIError("echo is not supported", param="echo")
        if self.logprobs is not None:
            raise APIError("logprobs is not supported", param="logprobs")
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(f"best_of must be 1, got {self.best_of}", param="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError("prompt must not be an empty list", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt given as token ids
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    add_generation_prompt: StrictBool = True  # vLLM extension

    def check(self) -> None:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise APIError(f"max_completion_tokens must be at least 1, got "
                               f"{self.max_completion_tokens}", param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if self.logprobs:
            raise APIError("logprobs is not supported", param="logprobs")


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """Pydantic error location -> OpenAI ``param`` (``("body", "messages", 0, "role")`` ->
    ``messages.0.role``); None for a body that is not JSON at all."""
    parts = [str(x) for x in loc if x != "body"]
    # union members show up as type names in the location (e.g. "list[int]"); drop them
    parts = [p for p in parts if not ("[" in p or p in {"str", "int", "float", "bool"})]
    return ".".join(parts) or None
