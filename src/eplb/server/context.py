"""What the request handlers share: the engine, settings, readiness, tokenizing, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from eplb.server.chat_template import ChatFormatter
from eplb.server.errors import APIError
from eplb.server.generation import EngineRunner
from eplb.server.lifecycle import Lifecycle
from eplb.server.metrics import ServerMetrics
from eplb.server.preprocess import Preprocessor, vocab_size
from eplb.server.responses import Usage

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_DRAIN_S = 5.0

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerSettings:
    served_model_names: list[str]
    max_model_len: int
    api_key: str | None = None
    chat_template: str | None = None  # Jinja source; None = the tokenizer's, else a fallback
    vocab_size: int | None = None  # the model's; token-id prompts must lie below it
    start_engine: bool = True  # False when the caller has already started it
    rebalance_log_interval_s: float = 1.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies answer 413
    drain_s: float = DEFAULT_DRAIN_S  # time open requests get after SIGTERM
    tokenizer_threads: int = 2
    stream_interval: int = 1  # streamed outputs every N tokens (vLLM's --stream-interval)
    # called with the exception when the engine fails (serve_cli stops uvicorn, exits non-zero)
    on_fatal: Callable[[BaseException], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class ServingContext:
    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.runner = EngineRunner(engine, self.lifecycle, settings.stream_interval)
        self.metrics = ServerMetrics(self._stats)
        self.prep: Preprocessor | None = None
        self.start_error: BaseException | None = None
        # parsing bodies and tokenizing: CPU work that must not run on the event loop, nor take
        # the threads that serve the sync endpoints (/health)
        self.pool = ThreadPoolExecutor(max_workers=settings.tokenizer_threads,
                                       thread_name_prefix="eplb-tokenize")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def parse(self, model: type[M], body: bytes) -> M:
        """A request model from a JSON body, parsed in the pool (a 4 MB body takes ~0.2 s)."""

        def parse() -> M:
            try:
                data = json.loads(body)  # the stdlib keeps a lone surrogate for the model to name
            except ValueError as exc:
                raise APIError(f"request body is not valid JSON: {exc}") from None
            try:
                return model.model_validate(data)
            except ValidationError as exc:
                raise RequestValidationError(exc.errors()) from None

        return await asyncio.get_running_loop().run_in_executor(self.pool, parse)

    def _stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.lifecycle.ready else {}

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    def on_start_failed(self, exc: BaseException) -> None:
        """The engine did not start: keep why (``eplb serve`` prints it) and tell ``on_fatal``."""
        self.start_error = exc
        if self.settings.on_fatal is not None:
            self.settings.on_fatal(exc)

    def on_ready(self) -> None:
        """The engine is up: build what depends on its tokenizer, then accept requests."""
        tok = self.engine.tokenizer
        s = self.settings
        formatter = ChatFormatter(tok, s.chat_template) if tok is not None else None
        vocab = s.vocab_size if s.vocab_size is not None else (
            vocab_size(tok) if tok is not None else None)
        self.prep = Preprocessor(tok, formatter, s.max_model_len, vocab, self.pool)
        self.lifecycle.mark_ready()

    def check_model(self, name: str | None) -> str:
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(f"model {name!r} does not exist; this server serves "
                           f"{', '.join(names)}", param="model", code="model_not_found")
        return name

    def usage(self, prompt_tokens: int, finals: list[Any]) -> Usage:
        """Usage of a finished request (counted into the metrics once, here)."""
        completion = sum(len(o.token_ids) for o in finals if o is not None)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion)
        return Usage.of(prompt_tokens, completion)
