"""The two generation endpoints as plain classes: each takes a validated request and a
"client went away" waiter and returns a typed response, or an iterator of SSE lines. They need no
HTTP app, so a test drives them with a fake engine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from eplb.server.context import ServingContext
from eplb.server.generation import Job
from eplb.server.preprocess import Preprocessor
from eplb.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from eplb.server.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
)
from eplb.server.streaming import DONE, ChunkLines, TextDeltas, sse

DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
MIN_LOGPROB = -9999.0  # as vLLM: JSON has no -Infinity

Disconnected = Callable[[], Awaitable[None]]
Result = Any  # a response model, or an AsyncIterator[str] of SSE lines


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _jobs(req: SamplingFields, prefix: str, ids_list: list[list[int]], max_tokens: int
          ) -> list[Job]:
    """n choices per prompt; choice index = prompt index * n + j."""
    return [Job(f"{prefix}-{i * req.n + j}", ids, req.sampling_params(max_tokens, j))
            for i, ids in enumerate(ids_list) for j in range(req.n)]


class _NewLogprobs:
    """Per choice: the (token id, TokenLogprob) pairs not yet sent in a stream."""

    def __init__(self, num_choices: int) -> None:
        self.sent = [0] * num_choices

    def take(self, choice: int, out: Any) -> list[tuple[int, Any]]:
        lps = out.logprobs or []
        start = self.sent[choice]
        self.sent[choice] = len(lps)
        return list(zip(out.token_ids[start:len(lps)], lps[start:]))


async def _stream_choices(
    ctx: ServingContext, req: SamplingFields, jobs: list[Job], prompt_tokens: int,
    render: Callable[[int, Any, str, list], Iterator[str]], usage_line: Callable[[Any], str],
) -> AsyncIterator[str]:
    """The SSE body both endpoints share: each engine output of choice k becomes the lines
    ``render(k, out, new_text, new_logprob_pairs)`` yields (text held back for stop strings, see
    ``TextDeltas``); an engine error ends the stream with an error event, never a cut; then the
    usage chunk when ``stream_options.include_usage`` asks for it, then ``[DONE]``."""
    deltas = TextDeltas(len(jobs), req.stop_list())
    new_lps = _NewLogprobs(len(jobs))
    finals: list[Any] = [None] * len(jobs)
    try:
        async for k, out in ctx.runner.stream(jobs):
            text = deltas.delta(k, out.text, out.finished)
            pairs = new_lps.take(k, out)
            if out.finished:
                finals[k] = out
            for line in render(k, out, text, pairs):
                yield line
    except Exception as exc:  # noqa: BLE001 - a stream ends with an error event, never a cut
        yield sse(ctx.runner.error(exc).body())
        yield DONE
        return
    usage = ctx.usage(prompt_tokens, finals)  # counted into the metrics whether sent or not
    if req.stream_options and req.stream_options.include_usage:
        yield usage_line(usage)
    yield DONE


def completion_logprobs(prep: Preprocessor, pairs: list[tuple[int, Any]], offset: int
                        ) -> CompletionLogprobs:
    """The legacy completions format; ``offset``: characters of text before the first token.
    A pair's logprob may be None (the first token of an echoed prompt)."""
    out = CompletionLogprobs()
    for tid, lp in pairs:
        text = prep.token_text(tid)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else _lp(lp.logprob))
        out.top_logprobs.append(None if lp is None else
                                {prep.token_text(i): _lp(v) for i, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def echo_logprobs(prep: Preprocessor, out: Any) -> CompletionLogprobs:
    """Log-probabilities of an echoed prompt, from the engine's ``prompt_logprobs``."""
    return completion_logprobs(prep, list(zip(out.prompt_token_ids, out.prompt_logprobs or [])), 0)


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def chat_logprobs(prep: Preprocessor, pairs: list[tuple[int, Any]]) -> ChatLogprobs:
    def entry(tid: int, value: float) -> TopLogprob:
        text = prep.token_text(tid)
        return TopLogprob(token=text, logprob=_lp(value), bytes=list(text.encode("utf-8")))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(tid, lp.logprob).model_dump(),
                         top_logprobs=[entry(i, v) for i, v in lp.top])
        for tid, lp in pairs])


def _admit(ctx: ServingContext, req: CompletionRequest | ChatCompletionRequest) -> str:
    """The checks a generation request passes before its prompt is read, in this order (each
    raises its 4xx/503): the request's own fields, the model name, the server accepting work,
    token ids within the vocabulary. Returns the model name to answer with."""
    req.check()
    model = ctx.check_model(req.model)
    ctx.lifecycle.check_accepting()
    req.check_token_ids(ctx.prep.vocab_size)
    return model


class CompletionHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: CompletionRequest, disconnected: Disconnected) -> Result:
        ctx = self.ctx
        model = _admit(ctx, req)
        prep = ctx.prep
        prompts = req.prompts()
        ids_list = [await prep.prompt_ids(p, "prompt") for p in prompts]
        max_tokens = min(prep.check_lengths(len(ids), req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS,
                                            "prompt") for ids in ids_list)
        echo = [p if isinstance(p, str) else await prep.decode(p) for p in prompts] \
            if req.echo else [""] * len(prompts)
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = _jobs(req, rid, ids_list, max_tokens)
        prompt_tokens = sum(len(ids) for ids in ids_list)
        head = {"id": rid, "created": int(time.time()), "model": model}
        n = req.n
        if req.stream:
            return self._stream(req, jobs, head, [echo[k // n] for k in range(len(jobs))],
                                prompt_tokens)
        finals = await ctx.runner.collect(jobs, disconnected)
        choices = []
        for k, out in enumerate(finals):
            prefix = echo[k // n]
            lp = None
            if out.logprobs is not None:
                lp = completion_logprobs(prep, list(zip(out.token_ids, out.logprobs)), len(prefix))
                if req.echo:
                    lp = _joined(echo_logprobs(prep, out), lp)
            choices.append(CompletionChoice(index=k, text=prefix + out.text, logprobs=lp,
                                            finish_reason=out.finish_reason or "stop"))
        return CompletionResponse(**head, choices=choices, usage=ctx.usage(prompt_tokens, finals))

    async def _stream(self, req: CompletionRequest, jobs: list[Job], head: dict[str, Any],
                      echo: list[str], prompt_tokens: int) -> AsyncIterator[str]:
        prep = self.ctx.prep
        offset = [len(e) for e in echo]  # characters sent per choice, for text_offset

        lines = ChunkLines(head, chat=False)

        def chunk(k: int, text: str, finish: str | None, lp: CompletionLogprobs | None) -> str:
            offset[k] += len(text)
            if lp is None:
                return lines.line(k, text, finish)
            return sse(CompletionResponse(**head, choices=[CompletionChoice(
                index=k, text=text, logprobs=lp, finish_reason=finish)]).body())

        def echo_chunk(k: int, out: Any = None) -> str:
            lp = echo_logprobs(prep, out) if out is not None else None
            return sse(CompletionResponse(**head, choices=[CompletionChoice(
                index=k, text=echo[k], logprobs=lp)]).body())

        # the prompt's log-probabilities come with the first output: its echo waits for that
        echo_waits = [bool(e) and req.logprobs is not None for e in echo]
        for k, e in enumerate(echo):
            if e and not echo_waits[k]:
                yield echo_chunk(k)

        def render(k: int, out: Any, text: str, pairs: list) -> Iterator[str]:
            if echo_waits[k]:
                echo_waits[k] = False
                yield echo_chunk(k, out)
            lp = completion_logprobs(prep, pairs, offset[k]) if out.logprobs is not None else None
            if out.finished:
                yield chunk(k, text, out.finish_reason or "stop", lp)
            elif text or pairs:
                yield chunk(k, text, None, lp)

        async for line in _stream_choices(
                self.ctx, req, jobs, prompt_tokens, render,
                lambda usage: sse(CompletionResponse(**head, choices=[], usage=usage).body())):
            yield line


class ChatHandler:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: ChatCompletionRequest, disconnected: Disconnected) -> Result:
        ctx = self.ctx
        model = _admit(ctx, req)
        prep = ctx.prep
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await prep.chat_ids(messages, req.add_generation_prompt)
        max_tokens = prep.check_lengths(len(ids), req.max_tokens, None, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        jobs = _jobs(req, rid, [ids], max_tokens)
        head = {"id": rid, "created": int(time.time()), "model": model}
        if req.stream:
            return self._stream(req, jobs, head, len(ids))
        finals = await ctx.runner.collect(jobs, disconnected)
        choices = [ChatChoice(
            index=k, message=ChatMessageOut(content=out.text),
            logprobs=(chat_logprobs(prep, list(zip(out.token_ids, out.logprobs)))
                      if out.logprobs is not None else None),
            finish_reason=out.finish_reason or "stop") for k, out in enumerate(finals)]
        return ChatCompletionResponse(**head, choices=choices, usage=ctx.usage(len(ids), finals))

    async def _stream(self, req: ChatCompletionRequest, jobs: list[Job], head: dict[str, Any],
                      prompt_tokens: int) -> AsyncIterator[str]:
        prep = self.ctx.prep

        lines = ChunkLines(head, chat=True)

        def chunk(k: int, delta: ChatDelta, finish: str | None = None,
                  lp: ChatLogprobs | None = None) -> str:
            return sse(ChatCompletionChunk(**head, choices=[ChatStreamChoice(
                index=k, delta=delta, logprobs=lp, finish_reason=finish)]).body())

        for k in range(len(jobs)):
            yield chunk(k, ChatDelta(role="assistant", content=""))

        def render(k: int, out: Any, text: str, pairs: list) -> Iterator[str]:
            if not (out.finished or text or pairs):
                return
            finish = (out.finish_reason or "stop") if out.finished else None
            if out.logprobs is None:
                yield lines.line(k, text or None, finish)
            else:
                yield chunk(k, ChatDelta(content=text or None), finish, chat_logprobs(prep, pairs))

        async for line in _stream_choices(
                self.ctx, req, jobs, prompt_tokens, render,
                lambda usage: sse(ChatCompletionChunk(**head, choices=[], usage=usage).body())):
            yield line
