"""The front's per-request mailbox: newest output wins until a final one, which nothing replaces."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from eplb.runtime.mailbox import LatestOutput, put_all


@given(st.lists(st.tuples(st.sampled_from(["put", "final", "get"]), st.integers()), max_size=30))
def test_get_returns_the_newest_item_and_final_items_stay(ops):
    async def run():
        box, got = LatestOutput(), []
        pending, final_seen = None, False  # the model: what get() must return next
        for op, value in ops:
            if op == "get":
                if pending is None:
                    continue  # would wait: checked below
                got.append(await box.get())
                assert got[-1] == pending
                pending = None
            elif not final_seen:
                box.put(value, op == "final")
                pending, final_seen = value, op == "final"
            else:
                box.put(value, op == "final")  # ignored after a final item
        if pending is not None:
            assert await box.get() == pending

    asyncio.run(run())


def test_a_waiting_get_wakes_on_put_and_a_batch_is_one_callback():
    async def run():
        a, b = LatestOutput(), LatestOutput()
        waiter = asyncio.create_task(a.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        asyncio.get_running_loop().call_soon_threadsafe(put_all, [(a, "x1", False), (b, "y1", False),
                                                                  (b, "y2", True)])
        assert await asyncio.wait_for(waiter, 5) == "x1"
        assert await b.get() == "y2"
        b.put("late", False)
        waiting = asyncio.create_task(b.get())  # nothing follows a final item
        await asyncio.sleep(0.01)
        assert not waiting.done()
        waiting.cancel()

    asyncio.run(run())
