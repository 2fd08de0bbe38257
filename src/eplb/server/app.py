"""The OpenAI-compatible HTTP app in front of a ``DPEngineClient`` (docs/interfaces.md "runtime").

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(streaming via server-sent events), GET /metrics. The engine is started in the background when the
app starts, so /health answers 503 (not "connection refused") while the ranks load. The work is
elsewhere: ``handlers`` (the endpoints), ``middleware`` (body limit, auth, metrics), ``lifecycle``
(readiness, drain on shutdown), ``preprocess`` (tokenizing off the event loop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eplb.server.context import ServerSettings, ServingContext
from eplb.server.errors import APIError, error_body, param_from_loc
from eplb.server.handlers import ChatHandler, CompletionHandler
from eplb.server.metrics import CONTENT_TYPE
from eplb.server.middleware import FrontDoor
from eplb.server.protocol import ChatCompletionRequest, CompletionRequest
from eplb.server.responses import ModelCard, ModelList

__all__ = ["ServerSettings", "create_app"]

logger = logging.getLogger("eplb.server")


async def _start_engine(ctx: ServingContext) -> None:
    settings = ctx.settings
    try:
        if settings.start_engine:
            await asyncio.to_thread(ctx.engine.start)
        ctx.on_ready()
        logger.info("engine ready: serving %s", ", ".join(settings.served_model_names))
    except BaseException as exc:  # noqa: BLE001 - includes SystemExit from a rank
        logger.error("engine failed to start: %r", exc)
        ctx.on_start_failed(exc)


async def _log_rebalances(ctx: ServingContext) -> None:
    # The ranks log their own rebalances; this line guarantees one in the server's log too.
    seen = 0
    while True:
        await asyncio.sleep(ctx.settings.rebalance_log_interval_s)
        if not ctx.ready or ctx.lifecycle.draining:
            continue
        try:
            stats = await asyncio.to_thread(ctx.engine.stats)
        except Exception:  # noqa: BLE001 - a stats query that failed: try at the next tick
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


def _validation_error(exc: RequestValidationError) -> JSONResponse:
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


async def _wait_disconnect(request: Request) -> None:
    # the body has been read, so the next ASGI message is http.disconnect
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _reply(result: Any) -> Response:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return JSONResponse(result.body())


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:
    ctx = ServingContext(engine, settings)
    completions_handler = CompletionHandler(ctx)
    chat_handler = ChatHandler(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.lifecycle.bind(asyncio.get_running_loop())
        tasks = [asyncio.create_task(_start_engine(ctx)), asyncio.create_task(_log_rebalances(ctx))]
        try:
            yield
        finally:
            ctx.lifecycle.expire()  # anything still open ends now, cleanly
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            ctx.close()
            logger.info("shutting down the engine")
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="eplb", lifespan=lifespan)
    app.state.eplb = ctx
    app.add_middleware(FrontDoor, metrics=ctx.metrics, max_body_bytes=settings.max_request_bytes,
                       api_key=settings.api_key)

    # ---- errors: always the OpenAI shape ---------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)),
                            status_code=exc.status_code)

    # ---- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    def health() -> Response:  # sync: is_healthy() may block on IPC, so it runs in a thread
        ok = ctx.ready and bool(engine.is_healthy())
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[ModelCard(id=name, created=settings.created, root=name,
                                         max_model_len=settings.max_model_len)
                               for name in settings.served_model_names]).body()

    # ---- generation ------------------------------------------------------------------------
    # bodies are parsed by ctx.parse (off the event loop), not by FastAPI
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await ctx.parse(CompletionRequest, await request.body())
        return _reply(await completions_handler(req, lambda: _wait_disconnect(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await ctx.parse(ChatCompletionRequest, await request.body())
        return _reply(await chat_handler(req, lambda: _wait_disconnect(request)))

    return app
