"""Readiness and graceful shutdown of the server.

On SIGTERM the server stops accepting connections and gives open requests ``drain_s`` seconds to
finish. When that time is up every request still running ends the same way: a non-streaming one
answers 503 JSON, a stream sends an error event and ``[DONE]`` (the engine requests are aborted).
Requests that reach the app after the drain started (on a kept-alive connection) answer 503.
"""

from __future__ import annotations

import asyncio
import logging

from eplb.server.errors import APIError, unavailable

logger = logging.getLogger("eplb.server")

# put into a request's output queue when the drain time is up
SHUTDOWN = object()


class Lifecycle:
    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.expired = False
        self._queues: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def mark_ready(self) -> None:
        """The engine is up: requests are accepted from now on."""
        self.ready = True

    # ---- the requests' side --------------------------------------------------------------
    def check_accepting(self) -> None:
        if self.draining:
            raise shutting_down()
        if not self.ready:
            raise unavailable("the engine is still starting; retry when /health answers 200")

    def register(self, q: asyncio.Queue) -> None:
        self._queues.add(q)
        if self.expired:
            q.put_nowait(SHUTDOWN)

    def unregister(self, q: asyncio.Queue) -> None:
        self._queues.discard(q)

    @property
    def in_flight(self) -> int:
        """Requests generating now."""
        return len(self._queues)

    # ---- the signal's side ---------------------------------------------------------------
    def begin_drain(self, drain_s: float) -> None:
        """Safe to call from a signal handler: the work happens on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._start, drain_s)

    def _start(self, drain_s: float) -> None:
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: %d request(s) in flight get %.1f s to finish",
                    self.in_flight, drain_s)
        asyncio.get_running_loop().call_later(drain_s, self.expire)

    def expire(self) -> None:
        """Ends every request still running (each answers 503 / an SSE error event)."""
        self.draining = True
        self.expired = True
        if self._queues:
            logger.info("drain time is up: ending %d request(s)", len(self._queues))
        for q in list(self._queues):
            q.put_nowait(SHUTDOWN)


def shutting_down() -> APIError:
    return unavailable("the server is shutting down")
