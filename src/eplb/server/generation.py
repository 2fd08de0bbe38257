"""Running a request's choices on the engine: fan-out, disconnects, shutdown, engine errors."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from eplb.server.errors import APIError, unavailable
from eplb.server.lifecycle import SHUTDOWN, Lifecycle, shutting_down

logger = logging.getLogger("eplb.server")


@dataclass
class Job:
    """One engine request: one choice of one prompt."""

    request_id: str
    prompt_ids: list[int]
    params: Any


class EngineRunner:
    """``stream_interval``: streamed requests get an output with the first token, then every N
    tokens, and the final one (``eplb serve --stream-interval``); collected ones the final only."""

    def __init__(self, engine: Any, lifecycle: Lifecycle, stream_interval: int = 1) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.stream_interval = stream_interval

    async def _run_one(self, job: Job, stream_interval: int | None) -> AsyncIterator[Any]:
        it = self.engine.generate(job.request_id, job.prompt_ids, job.params, stream_interval=stream_interval)
        if inspect.isawaitable(it):
            it = await it
        finished = False
        try:
            async for out in it:
                finished = finished or bool(out.finished)
                yield out
        finally:
            if not finished:
                await self.engine.abort(job.request_id)

    async def stream(self, jobs: list[Job], *, final_only: bool = False) -> AsyncIterator[tuple[int, Any]]:
        """Runs every job at once; yields (job index, RequestOutput) as outputs come (with
        ``final_only``, each job's final output alone). Raises the first engine error, or 503
        when the server's drain time is up."""
        interval = None if final_only else self.stream_interval
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in self._run_one(jobs[i], interval):
                    await queue.put((i, out))
                await queue.put((i, done))
            except BaseException as exc:  # noqa: BLE001 - errors (and cancellation) go to the consumer
                await queue.put((i, exc))

        self.lifecycle.register(queue)
        pumps = [asyncio.create_task(pump(i)) for i in range(len(jobs))]
        try:
            remaining = len(jobs)
            while remaining:
                entry = await queue.get()
                if entry is SHUTDOWN:
                    raise shutting_down()
                i, item = entry
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            self.lifecycle.unregister(queue)
            for p in pumps:
                p.cancel()  # the pumps' finally aborts their engine requests
            await asyncio.gather(*pumps, return_exceptions=True)

    async def collect(self, jobs: list[Job], disconnected: Callable[[], Awaitable[None]]
                      ) -> list[Any]:
        """The final output of every job; aborts them all if the client goes away first."""
        finals: list[Any] = [None] * len(jobs)

        async def gather() -> None:
            async for i, out in self.stream(jobs, final_only=True):
                finals[i] = out

        work = asyncio.create_task(gather())
        gone = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, gone, return_exceptions=True)
        if work.cancelled():
            raise APIError("client disconnected", status=499)
        exc = work.exception()
        if exc is not None:
            raise self.error(exc) from None
        return finals

    def error(self, exc: BaseException) -> APIError:
        """An engine failure as the error the client gets."""
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ValueError):  # the engine rejected the request itself
            return APIError(str(exc))
        if self.lifecycle.draining:
            return shutting_down()
        try:
            healthy = bool(self.engine.is_healthy())
        except Exception:  # noqa: BLE001 - an engine that cannot say is not healthy
            healthy = False
        if not healthy or isinstance(exc, RuntimeError):  # a rank died, stalled or stopped
            return unavailable(f"the engine is not running: {exc}")
        logger.error("generation failed: %r", exc)
        return APIError(f"generation failed: {exc!r}", status=500, type="server_error")
