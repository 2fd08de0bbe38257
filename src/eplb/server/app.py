"""The OpenAI-compatible HTTP app in front of a ``DPEngineClient`` (docs/interfaces.md "runtime").

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streaming via server-sent events), GET /metrics. The engine is started in the background when the
app starts, so /health answers 503 (not "connection refused") while the ranks load.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eplb.server.chat_template import ChatFormatter, encode
from eplb.server.metrics import CONTENT_TYPE, ServerMetrics
from eplb.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    param_from_loc,
)

logger = logging.getLogger("eplb.server")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # the OpenAI default for /v1/completions


@dataclass
class ServerSettings:
    served_model_names: list[str]
    max_model_len: int
    api_key: str | None = None
    chat_template: str | None = None  # Jinja source; None = the tokenizer's, else a fallback
    vocab_size: int | None = None  # the model's; token-id prompts must lie below it
    start_engine: bool = True  # False when the caller has already started it
    rebalance_log_interval_s: float = 1.0
    # called with the exception when the engine fails to start (serve_cli stops uvicorn)
    on_fatal: Callable[[BaseException], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def _vocab_size(tok: Any) -> int | None:
    """Token count of a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    if hasattr(tok, "get_vocab_size"):
        return int(tok.get_vocab_size())
    try:
        return len(tok)
    except TypeError:
        return None


class _State:
    """What the handlers share: engine, readiness, tokenizer-derived helpers."""

    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.ready = False
        self.start_error: BaseException | None = None
        self.formatter: ChatFormatter | None = None
        self.vocab_size: int | None = None
        self.metrics = ServerMetrics(self._stats)

    def _stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.ready else {}

    def on_ready(self) -> None:
        tok = self.engine.tokenizer
        if tok is not None:
            self.formatter = ChatFormatter(tok, self.settings.chat_template)
            self.vocab_size = _vocab_size(tok)
        if self.settings.vocab_size is not None:
            self.vocab_size = self.settings.vocab_size
        self.ready = True

    def check_ready(self) -> None:
        if not self.ready:
            raise APIError("the engine is still starting; retry when /health answers 200",
                           status=503, type="service_unavailable")


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:
    state = _State(engine, settings)
    tasks: list[asyncio.Task] = []

    async def start_engine() -> None:
        try:
            if settings.start_engine:
                await asyncio.to_thread(engine.start)
            state.on_ready()
            logger.info("engine ready: serving %s", ", ".join(settings.served_model_names))
        except BaseException as exc:  # includes SystemExit from a rank
            state.start_error = exc
            logger.error("engine failed to start: %r", exc)
            if settings.on_fatal is not None:
                settings.on_fatal(exc)

    async def log_rebalances() -> None:
        # The ranks log their own rebalances; this line guarantees one in the server's log too.
        seen = 0
        while True:
            await asyncio.sleep(settings.rebalance_log_interval_s)
            if not state.ready:
                continue
            try:
                stats = await asyncio.to_thread(engine.stats)
            except Exception:
                continue
            done = int(stats.get("rebalances", 0) or 0)
            if done > seen:
                logger.info(
                    "EPLB rebalance completed: rebalances=%d failed=%s copies_moved=%s "
                    "bytes_moved=%s last_rebalance_s=%.3f balancedness=%s",
                    done, stats.get("rebalances_failed"), stats.get("copies_moved"),
                    stats.get("bytes_moved"), float(stats.get("last_rebalance_s") or 0.0),
                    stats.get("balancedness"),
                )
                seen = done

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks.append(asyncio.create_task(start_engine()))
        tasks.append(asyncio.create_task(log_rebalances()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            logger.info("shutting down the engine")
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="eplb", lifespan=lifespan)
    app.state.eplb = state

    # ---- errors: always the OpenAI shape ---------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            param = None
        else:
            param = param_from_loc(tuple(first.get("loc", ())))
            # a union field fails once per member: list every expectation for that field
            msgs = list(dict.fromkeys(e["msg"] for e in errors
                                      if param_from_loc(tuple(e.get("loc", ()))) == param))
            shown = repr(first.get("input"))[:80]
            msg = (f"invalid value {shown} for {param}: {'; or '.join(msgs)}" if param
                   else f"invalid request body: {first['msg']}")
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path.startswith("/v1/") and settings.api_key is not None:
            header = request.headers.get("authorization", "")
            if not hmac.compare_digest(header.encode(), f"Bearer {settings.api_key}".encode()):
                state.metrics.requests.labels(path, "401").inc()
                return JSONResponse(
                    error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        if path.startswith("/v1/"):
            state.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    # ---- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    def health() -> Response:  # sync: is_healthy() may block on IPC, so it runs in a thread
        ok = state.ready and bool(engine.is_healthy())
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": settings.created, "owned_by": "eplb",
             "root": name, "max_model_len": settings.max_model_len}
            for name in settings.served_model_names]}

    def check_model(name: str | None) -> str:
        if name is None:
            return settings.served_model_names[0]
        if name not in settings.served_model_names:
            raise APIError(f"model {name!r} does not exist; this server serves "
                           f"{', '.join(settings.served_model_names)}", param="model",
                           code="model_not_found")
        return name

    def check_lengths(prompt_ids: list[int], max_tokens: int | None, default: int | None,
                      param: str) -> int:
        n, limit = len(prompt_ids), settings.max_model_len
        if n == 0:
            raise APIError("the prompt is empty", param=param)
        if state.vocab_size is not None and any(not 0 <= t < state.vocab_size for t in prompt_ids):
            raise APIError(f"prompt token ids must be in [0, {state.vocab_size})", param=param)
        if n >= limit:
            raise APIError(f"the prompt has {n} tokens; this model's maximum context length is "
                           f"{limit} tokens (--max-model-len), which leaves no room to generate",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return min(default, limit - n) if default is not None else limit - n
        if n + max_tokens > limit:
            raise APIError(f"this model's maximum context length is {limit} tokens, but the "
                           f"prompt has {n} and max_tokens is {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    # ---- generation ------------------------------------------------------------------------
    async def run_one(request_id: str, prompt_ids: list[int], params: Any) -> AsyncIterator[Any]:
        it = engine.generate(request_id, prompt_ids, params)
        if inspect.isawaitable(it):
            it = await it
        finished = False
        try:
            async for out in it:
                finished = finished or bool(out.finished)
                yield out
        finally:
            if not finished:
                await engine.abort(request_id)

    async def generate_all(ids_list: list[list[int]], params: Any, prefix: str
                           ) -> AsyncIterator[tuple[int, Any]]:
        """Runs every prompt at once; yields (prompt index, RequestOutput) as outputs come."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in run_one(f"{prefix}-{i}", ids_list[i], params):
                    await queue.put((i, out))
                await queue.put((i, done))
            except BaseException as exc:  # hand errors to the consumer
                await queue.put((i, exc))

        pumps = [asyncio.create_task(pump(i)) for i in range(len(ids_list))]
        try:
            remaining = len(ids_list)
            while remaining:
                i, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def count_tokens(finals: list[Any]) -> tuple[int, int]:
        p = sum(len(o.prompt_token_ids) for o in finals)
        c = sum(len(o.token_ids) for o in finals)
        state.metrics.prompt_tokens.inc(p)
        state.metrics.generation_tokens.inc(c)
        return p, c

    async def collect(request: Request, ids_list: list[list[int]], params: Any, prefix: str
                      ) -> list[Any]:
        """Final output per prompt; aborts everything if the client goes away first."""
        finals: list[Any] = [None] * len(ids_list)

        async def gather() -> None:
            async for i, out in generate_all(ids_list, params, prefix):
                finals[i] = out

        work = asyncio.create_task(gather())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # generate_all's finally aborts the engine requests
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            raise APIError("client disconnected", status=499)
        work.result()  # re-raise engine errors
        return finals

    def engine_error(exc: Exception) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ValueError):  # the engine rejected the request itself
            return APIError(str(exc))
        if not engine.is_healthy():  # a rank died or we are shutting down
            return APIError(f"the engine is not running: {exc}", status=503,
                            type="service_unavailable")
        logger.exception("generation failed")
        return APIError(f"generation failed: {exc!r}", status=500, type="server_error")

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def stream_events(ids_list: list[list[int]], params: Any, prefix: str, holdback: int,
                      make_chunk: Callable[[int, str, str | None], dict[str, Any]],
                      first_chunks: list[dict[str, Any]], include_usage: bool,
                      usage_chunk: Callable[[dict[str, int]], dict[str, Any]]
                      ) -> AsyncIterator[str]:
        async def events() -> AsyncIterator[str]:
            sent = [0] * len(ids_list)  # characters of text already streamed, per prompt
            finals: list[Any] = [None] * len(ids_list)
            for chunk in first_chunks:
                yield sse(chunk)
            try:
                async for i, out in generate_all(ids_list, params, prefix):
                    text = out.text
                    # hold back the tail that may still change: a half-generated stop string,
                    # or U+FFFD from a multi-byte character whose remaining bytes are to come
                    end = len(text) if out.finished else max(
                        sent[i], min(len(text) - holdback, len(text.rstrip("\ufffd"))))
                    delta = text[sent[i]:end]
                    sent[i] = max(sent[i], end)
                    if out.finished:
                        finals[i] = out
                        yield sse(make_chunk(i, delta, out.finish_reason or "stop"))
                    elif delta:
                        yield sse(make_chunk(i, delta, None))
            except Exception as exc:
                err = engine_error(exc)
                yield sse(err.body())
                yield "data: [DONE]\n\n"
                return
            p, c = count_tokens([f for f in finals if f is not None])
            if include_usage:
                yield sse(usage_chunk({"prompt_tokens": p, "completion_tokens": c,
                                       "total_tokens": p + c}))
            yield "data: [DONE]\n\n"

        return events()

    def usage(p: int, c: int) -> dict[str, int]:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        req.check()
        model = check_model(req.model)
        state.check_ready()
        tok = engine.tokenizer
        ids_list: list[list[int]] = []
        max_tokens: int | None = None
        for prompt in req.prompts():
            if isinstance(prompt, str) and tok is None:
                raise APIError("this model has no tokenizer; send the prompt as token ids",
                               param="prompt")
            ids = encode(tok, prompt) if isinstance(prompt, str) else list(prompt)
            mt = check_lengths(ids, req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
            max_tokens = mt if max_tokens is None else min(max_tokens, mt)
            ids_list.append(ids)
        params = req.sampling_params(max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": text, "logprobs": None,
                                 "finish_reason": finish}]}

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            events = stream_events(
                ids_list, params, rid, _holdback(req.stop_list()), chunk, [], include,
                lambda u: {"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": u})
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            finals = await collect(request, ids_list, params, rid)
        except Exception as exc:
            raise engine_error(exc) from None
        p, c = count_tokens(finals)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [chunk(i, o.text, o.finish_reason or "stop")["choices"][0]
                            for i, o in enumerate(finals)],
                "usage": usage(p, c)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        req.check()
        model = check_model(req.model)
        state.check_ready()
        if engine.tokenizer is None or state.formatter is None:
            raise APIError("this model has no tokenizer, so chat is unavailable; use "
                           "/v1/completions with token ids", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = state.formatter.render(messages, req.add_generation_prompt)
        except Exception as exc:  # the template itself may reject a conversation
            raise APIError(f"chat template failed: {exc}", param="messages") from None
        ids = encode(engine.tokenizer, text,
                     add_special_tokens=not state.formatter.uses_tokenizer_template)
        max_tokens = check_lengths(ids, req.max_tokens, None, "messages")
        params = req.sampling_params(max_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": i, "delta": {"content": text} if text
                                                 else {}, "logprobs": None,
                                                 "finish_reason": finish}]}

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            first = {"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                         "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
            events = stream_events(
                [ids], params, rid, _holdback(req.stop_list()), chunk, [first], include,
                lambda u: {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": u})
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            (final,) = await collect(request, [ids], params, rid)
        except Exception as exc:
            raise engine_error(exc) from None
        p, c = count_tokens([final])
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                             "logprobs": None, "finish_reason": final.finish_reason or "stop"}],
                "usage": usage(p, c)}

    return app


def _holdback(stops: list[str]) -> int:
    """Characters a stream keeps back so a half-generated stop string is never sent."""
    return max((len(s) for s in stops), default=1) - 1


async def _wait_disconnect(request: Request) -> None:
    # the body has been read, so the next ASGI message is http.disconnect
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
