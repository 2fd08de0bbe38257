"""The newest output of one streamed request, handed from the front's reader thread to the
request's asyncio task.

Outputs are cumulative (every token and the whole text so far), so a newer output holds all an
older one does: when the consumer has not taken an output before the next arrives, the newer
replaces it. A consumer that falls behind (one event loop streaming hundreds of requests) then
sends fewer, larger chunks instead of queueing a backlog that grows every step, as vLLM's
output collector does. A final item (the finished output, an error, an abort) is never
replaced and nothing after it is kept.
"""

from __future__ import annotations

import asyncio
from typing import Any

_EMPTY = object()


class LatestOutput:
    """One request's mailbox; ``put`` and ``get`` run on the same event loop."""

    __slots__ = ("_item", "_final", "_waiter")

    def __init__(self) -> None:
        self._item: Any = _EMPTY
        self._final = False
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any, final: bool) -> None:
        """Offer ``item``; ``final``: nothing may replace or follow it."""
        if self._final:
            return
        self._item = item
        self._final = final
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        """The newest item not yet taken (waits for one)."""
        while self._item is _EMPTY:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._item = self._item, _EMPTY
        return item


def put_all(items: list[tuple[LatestOutput, Any, bool]]) -> None:
    """Deliver a batch (one step's outputs) with one wake-up of the loop: the reader thread
    schedules this once per step instead of once per request."""
    for box, item, final in items:
        box.put(item, final)
