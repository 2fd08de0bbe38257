"""OpenAI request models and their validation.

Strict types (``"5"`` is not an integer) and every string checked to be valid UTF-8 text (a lone
surrogate such as ``"\\ud800"`` cannot be tokenized), so bad input is a 400 naming the field.
OpenAI fields we do not implement are accepted only at their neutral value; anything else is a 400
naming them (``UNSUPPORTED``). Unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
)

from eplb.server.errors import APIError

MAX_CHOICES = 128  # prompts x n of one request: each choice is one engine request
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOPS = 64  # stop strings, and stop token ids: each is checked at every generated token
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes, negative ones folded in


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid UTF-8 text ({exc.reason} at character {exc.start})") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_utf8)]
Number = Union[StrictInt, StrictFloat]


def _neutral(value: Any, *neutral: Any) -> bool:
    return value is None or any(value == n for n in neutral)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields common to completions and chat."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # vLLM extension
    min_p: Number | None = None  # vLLM extension
    stop: Text | list[Text] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM extension
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None  # vLLM extension
    logit_bias: dict[StrictStr, Number] | None = None
    min_tokens: StrictInt = 0  # vLLM extension
    ignore_eos: StrictBool = False  # vLLM extension, handy for load tests
    user: Text | None = None  # accepted; only identifies the caller to OpenAI
    # vLLM extensions we do not implement: accepted only at their neutral value
    use_beam_search: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    # field -> values that mean "not used"
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "use_beam_search": (False,), "include_stop_str_in_output": (False,),
        "skip_special_tokens": (True,), "prompt_logprobs": (), "guided_json": (),
        "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
    }

    def check_common(self) -> None:
        for name, neutral in self.UNSUPPORTED.items():
            if not _neutral(getattr(self, name), *neutral):
                raise APIError(f"{name} is not supported by this server; leave it unset",
                               param=name)
        if not 1 <= self.n <= MAX_CHOICES:
            raise APIError(f"n must be in [1, {MAX_CHOICES}], got {self.n}", param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        _range(self.temperature, "temperature", 0, 2)
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise APIError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise APIError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}", param="top_k")
        _range(self.min_p, "min_p", 0, 1)
        _range(self.presence_penalty, "presence_penalty", -2, 2)
        _range(self.frequency_penalty, "frequency_penalty", -2, 2)
        if self.repetition_penalty is not None and not (
                math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2):
            raise APIError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}",
                           param="repetition_penalty")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise APIError(f"seed must be in [-2^63, 2^64), got {self.seed}", param="seed")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise APIError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}",
                           param="min_tokens")
        if any(s == "" for s in self.stop_list()):
            raise APIError("stop strings must be non-empty", param="stop")
        for name, values in (("stop", self.stop_list()), ("stop_token_ids", self.stop_token_ids or [])):
            if len(values) > MAX_STOPS:
                raise APIError(f"{name} has {len(values)} entries; at most {MAX_STOPS}", param=name)
        if self.logit_bias is not None:
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                raise APIError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                               f"{MAX_LOGIT_BIAS_ENTRIES}", param="logit_bias")
            for key, value in self.logit_bias.items():
                if not key.isdigit() or len(key) > 12:  # isdigit: no sign, no spaces
                    raise APIError(f"logit_bias keys must be token ids, got {key!r}",
                                   param="logit_bias")
                if not (math.isfinite(value) and -100 <= value <= 100):
                    raise APIError(f"logit_bias values must be in [-100, 100], got {value} for "
                                   f"token {key}", param="logit_bias")

    def check_token_ids(self, vocab_size: int | None) -> None:
        """Token ids in stop_token_ids and logit_bias must exist in the model."""
        if vocab_size is None:
            return
        for name, ids in (("stop_token_ids", self.stop_token_ids or []),
                          ("logit_bias", [int(k) for k in self.logit_bias or {}])):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(f"{name}: token id {bad[0]} is not in [0, {vocab_size})", param=name)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def num_logprobs(self) -> int | None:
        raise NotImplementedError

    def num_prompt_logprobs(self) -> int | None:
        return None

    def sampling_params(self, max_tokens: int, index: int = 0) -> Any:
        """An ``eplb.engine.SamplingParams`` for choice ``index`` of a prompt (as vLLM, a seeded
        request with n > 1 seeds choice j with seed + j). Imported here: the protocol has no torch
        import."""
        from eplb.engine import SamplingParams

        if self.min_tokens > max_tokens:  # max_tokens came from a default or the context left
            raise APIError(f"min_tokens ({self.min_tokens}) is more than the {max_tokens} tokens "
                           f"this request may generate", param="min_tokens")
        top_k = self.top_k if self.top_k not in (None, 0) else -1
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=top_k,
            min_p=float(self.min_p or 0.0),
            seed=seed,
            stop=self.stop_list() or None,
            stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids else None,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=float(self.presence_penalty or 0.0),
            frequency_penalty=float(self.frequency_penalty or 0.0),
            repetition_penalty=float(1.0 if self.repetition_penalty is None
                                     else self.repetition_penalty),
            logit_bias={int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias
            else None,
            logprobs=self.num_logprobs(),
            prompt_logprobs=self.num_prompt_logprobs(),
        )


def _range(value: float | None, name: str, lo: float, hi: float) -> None:
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise APIError(f"{name} must be in [{lo}, {hi}], got {value}", param=name)


def _prompt_kind(value: Any) -> str:
    """Which form a prompt takes, from its first element: one variant is validated, not four
    (a plain union tried list[str] on a 3,000-id prompt first: 0.9 ms of errors thrown away).
    The tags read as types, so error locations drop them (``errors.param_from_loc``)."""
    if not isinstance(value, list):
        return "str" if isinstance(value, str) else type(value).__name__  # no such tag: a 400 listing them
    first = value[0] if value else 0
    return "list[str]" if isinstance(first, str) else "list[list[int]]" if isinstance(first, list) else "list[int]"


PromptType = Annotated[Union[Annotated[Text, Tag("str")], Annotated[list[Text], Tag("list[str]")],
                             Annotated[list[StrictInt], Tag("list[int]")],
                             Annotated[list[list[StrictInt]], Tag("list[list[int]]")]],
                       Discriminator(_prompt_kind, custom_error_type="prompt_type",
                                     custom_error_message="should be a string, a list of strings, a list "
                                                          "of token ids or a list of token-id lists")]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: Any = None
    best_of: StrictInt | None = None

    def check(self) -> None:
        self.check_common()
        if not _neutral(self.suffix, ""):
            raise APIError("suffix is not supported by this server (no fill-in-the-middle); "
                           "leave it unset", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(f"best_of must equal n ({self.n}): choices are not ranked, got "
                           f"{self.best_of}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                           param="logprobs")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError("prompt must not be an empty list", param="prompt")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise APIError(f"{len(self.prompts())} prompts x n={self.n} is more than "
                           f"{MAX_CHOICES} choices per request", param="prompt")

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None  # echoed tokens come with theirs

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
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True  # vLLM extension
    # OpenAI chat fields we do not implement: accepted only at their neutral value
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    echo: Any = None  # vLLM's chat extension

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **SamplingFields.UNSUPPORTED, "tools": ([],), "tool_choice": ("none",),
        "functions": ([],), "function_call": ("none",),
        "response_format": ({"type": "text"},), "audio": (),
        "modalities": (["text"],), "prediction": (), "web_search_options": (),
        "reasoning_effort": (), "verbosity": (), "echo": (False,)}

    def check(self) -> None:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:
                raise APIError(f"max_completion_tokens must be at least 1, got "
                               f"{self.max_completion_tokens}", param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                               f"{self.top_logprobs}", param="top_logprobs")
            if not self.logprobs:
                raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
